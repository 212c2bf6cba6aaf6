"""Reading a whole KV bucket (its keys) or a key's history, without nats-py's
false "nothing there".

nats-py's `keys()` and `history()` (and any watch of a bucket) run a watcher that decides the initial
values are all in once the consumer's pending count reads 0; that count can
read 0 after the server delivered the first entries and before the watcher
took them, and the watcher then ends empty: NoKeysError for a bucket that has
keys (seen in the suite, on a loaded machine, for the advert bucket and a
resource's history). Here an empty answer is believed only when the stream
holds nothing for it, or after three tries.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.errors
from nats.js.errors import NoKeysError, NotFoundError
from nats.js.kv import KeyValue

TRIES = 3


async def _holds_any(kv: KeyValue, key: str | None) -> bool:
    """Whether the bucket's stream holds any message (for `key`, if given)."""
    js: Any = getattr(kv, "_js", None)
    stream = getattr(kv, "_stream", None)
    if js is None or stream is None:
        return True
    if key is None:
        info = await js.stream_info(stream)
        return int(info.state.messages or 0) > 0
    pre = getattr(kv, "_pre", f"$KV.{getattr(kv, '_name', '')}.")
    try:
        await js.get_last_msg(stream, f"{pre}{key}")
    except NotFoundError:
        return False
    return True


async def keys(kv: KeyValue) -> list[str]:
    """Every live key of the bucket ([] when there is none)."""
    for attempt in range(TRIES):
        try:
            return list(await kv.keys())
        except NoKeysError:
            if attempt == TRIES - 1 or not await _holds_any(kv, None):
                return []
    return []


async def history(kv: KeyValue, key: str) -> list[Any]:
    """Every entry the bucket keeps for `key`, oldest first ([] when none)."""
    for attempt in range(TRIES):
        try:
            return list(await kv.history(key))
        except NoKeysError:
            if attempt == TRIES - 1 or not await _holds_any(kv, key):
                return []
    return []


async def latest(kv: KeyValue, deadline_s: float | None = None,
                 idle_s: float = 5.0) -> dict[str, bytes]:
    """The latest value of every live key, in one watch of the bucket (not a
    read per key). A watch ends when the watcher says the initial values are
    in, when none came for `idle_s`, or after `deadline_s` in all."""
    for attempt in range(TRIES):
        out = await _watch_once(kv, deadline_s, idle_s)
        if out or attempt == TRIES - 1 or not await _holds_any(kv, None):
            return out
    return {}


async def _watch_once(kv: KeyValue, deadline_s: float | None,
                      idle_s: float) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        loop = asyncio.get_running_loop()
        deadline = None if deadline_s is None else loop.time() + deadline_s
        while True:
            wait = idle_s if deadline is None else min(idle_s, deadline - loop.time())
            try:
                entry = await watcher.updates(  # type: ignore[no-untyped-call]
                    timeout=max(0.1, wait))
            except (TimeoutError, nats.errors.TimeoutError):
                break
            if entry is None:
                break
            if entry.value:
                out[entry.key] = entry.value
            else:
                out.pop(entry.key, None)
            if deadline is not None and loop.time() >= deadline:
                break
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]
    return out
