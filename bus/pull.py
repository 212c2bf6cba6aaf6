"""A no-wait pull: take what a consumer has right now, up to `batch`, and return.

nats-py's `fetch` long-polls an empty consumer for its whole timeout; a worker
that serves many (capability, priority) consumers needs to ask each one
"anything now?" in one round trip, in priority order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg


async def pull_now(nc: NATS, stream: str, consumer: str, batch: int,
                   timeout: float = 2.0) -> list[Msg]:
    reply = nc.new_inbox()
    # JetStream delivers pulled messages under their own subjects to the
    # reply inbox's subscription, so each pull gets a subscription of its own.
    sub = await nc.subscribe(reply, max_msgs=0)
    # Read straight from the subscription's queue: nats-py's next_msg makes a
    # task (named by a fresh uuid4) and a wait_for per message; here a wait
    # happens only when the queue is empty, which a batch rarely leaves it.
    queue: asyncio.Queue[Msg] = sub._pending_queue
    out: list[Msg] = []
    try:
        req = json.dumps({"batch": batch, "no_wait": True}).encode()
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", req, reply=reply)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < batch:
            try:
                msg = queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    msg = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
            sub._pending_size -= len(msg.data)
            if _is_status(msg):
                break  # 404 no messages, 408 request timeout, 409 ...
            out.append(msg)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        # Anything that raced in after we stopped goes straight back.
        while True:
            try:
                late = queue.get_nowait()
            except Exception:
                break
            if not _is_status(late):
                with contextlib.suppress(Exception):
                    await late.nak()
    return out


def _is_status(msg: Msg) -> bool:
    return not msg.data and bool(msg.headers) and "Status" in (msg.headers or {})
