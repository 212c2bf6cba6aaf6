"""Every outcome settled in one place: the record, the event, the message.

    outcome     record (lifecycle)       event          message
    ----------  -----------------------  -------------  --------------------------
    Succeeded   succeed                  succeeded      ack
    Failed      fail                     failed         ack
    Retry       retry                    retrying       nak after the backoff
    Dead        exhaust | kill           dead           dead-letter, term
    Cancelled   confirm_cancel           cancelled      ack
    Delegated   undo_start (if started)  delegated (once per worker)   nak, growing delay
    Busy        -                        -              nak after a short delay
    Abandoned   -                        -              left for the attempt that owns it
    Announced   -                        its terminal event again       ack (dead: term)
    Rejected    -                        -              dead-letter, term

An event is stored before its message is settled (ack, nak, term), so a refused
event leaves the message to come back and the event to be said again.

A record write that finds the job owned elsewhere (another attempt took it)
leaves the message alone: the owner settles it. The events of an attempt go
out on one connection in order; the outcome's event waits for the ones still
in flight (running, progress), then the acknowledgement follows it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from agents.worker.attempt import Attempt
from agents.worker.ledger import Ledger
from agents.worker.outcome import (
    Abandoned,
    Announced,
    Busy,
    Cancelled,
    Dead,
    Delegated,
    Failed,
    Outcome,
    Rejected,
    Retry,
    Stopped,
    Succeeded,
)
from bus import codec
from bus.connection import Bus
from bus.consumer import backoff
from bus.jobtable import emit
from bus.objects import ObjectStore
from schemas import lifecycle as lc
from schemas.common import ObjRef
from schemas.events import Delegated as DelegatedEvent
from schemas.events import JobEvent

log = logging.getLogger(__name__)


class Settler:
    def __init__(self, bus: Bus, ledger: Ledger, worker_id: str,
                 ring_for_others: Callable[[str, int, float], None],
                 objects: ObjectStore) -> None:
        self.bus = bus
        self.objects = objects
        self.ledger = ledger
        self.worker_id = worker_id
        self.ring_for_others = ring_for_others
        self.delegated: set[str] = set()  # jobs this worker handed back (said once)
        self.completed = 0

    async def settle(self, att: Attempt, outcome: Outcome) -> None:
        d = att.delivery
        job_id, n = att.job_id, att.number
        event: JobEvent | None
        if att.started and att.ctx is not None and att.ctx.resources.reads:
            await self.ledger.apply(job_id, lc.note_reads(n, att.ctx.resources.reads))
        if isinstance(outcome, Succeeded):
            result, ref = await self._result(att, outcome.result)
            event = await self.ledger.succeed(job_id, n, result, outcome.duration_s, ref)
            await self._announce(att, event, d.ack)
        elif isinstance(outcome, Failed):
            event = await self.ledger.fail(job_id, n, outcome.error)
            await self._announce(att, event, d.ack)
        elif isinstance(outcome, Retry):
            event = await self.ledger.retry(job_id, n, outcome.error, outcome.delay_s)
            await self._announce(att, event, lambda: d.nak(outcome.delay_s))
        elif isinstance(outcome, Dead):
            event = await self.ledger.dead(job_id, n or (att.state.attempt if att.state else 0),
                                           outcome.error, att.started)
            await self._announce(att, event, None)
            await self._dead_letter(att, f"{outcome.error.code}: {outcome.error.message}")
        elif isinstance(outcome, Cancelled):
            attempt = n if att.started else (att.state.attempt if att.state else 0)
            event = await self.ledger.cancelled(job_id, attempt, outcome.reason)
            await self._announce(att, event, d.ack, always=True)
        elif isinstance(outcome, Delegated):
            await self._delegate(att, outcome.reason)
        elif isinstance(outcome, Busy):
            await d.nak(outcome.delay_s)
        elif isinstance(outcome, Abandoned):
            d.settled = True  # the newer attempt owns the message: acking would delete it
        elif isinstance(outcome, Announced):
            event = self.ledger.reannouncement(outcome.state)
            if event is not None:
                await emit(self.bus, event)  # refused: not settled, said again later
            if outcome.state.state == "dead":
                await self._dead_letter(att, outcome.state.error.message
                                        if outcome.state.error else "dead")
            else:
                await d.ack()
        elif isinstance(outcome, Rejected):
            await self._dead_letter(att, outcome.reason)
        elif isinstance(outcome, Stopped):  # the retry policy maps these; never settle raw
            raise AssertionError(f"unmapped stop {outcome.reason}")
        if att.started:
            self.completed += 1

    async def _result(self, att: Attempt, result: Any) -> tuple[Any, ObjRef | None]:
        """A result too large for the record goes to the object store, by reference."""
        size = len(codec.encode(result))
        if size <= self.bus.settings.max_result_bytes:
            return result, None
        ref = await self.objects.put(codec.encode(result),
                                     name=f"results/{att.job_id}/{att.number}")
        return None, ref

    async def _announce(self, att: Attempt, event: JobEvent | None,
                        ack: Callable[[], Any] | None, *, always: bool = False) -> None:
        """The outcome's event after the attempt's earlier ones, with the ack."""
        if event is None and not always:
            # The record was not ours to change: another attempt owns the job.
            att.delivery.settled = True
            return
        if att.pending:
            await asyncio.gather(*att.pending, return_exceptions=True)
        # The event is stored before the message is settled, never beside it: the
        # two go to different streams (in a cluster, different leaders), and an
        # ack that lands while the event is refused would lose the event for good.
        # Refused, it raises: the message comes back and the event is said again.
        if event is not None:
            await emit(self.bus, event)
        if ack is not None:
            await ack()

    async def _delegate(self, att: Attempt, reason: str) -> None:
        """Hand the job back for another worker without using an attempt; said
        once per worker. The nak delay grows with the deliveries, so a job no
        live worker can serve waits in the stream instead of spinning."""
        item = att.item
        if att.started:
            await self.ledger.undo(item.job_id, att.number)
        if item.job_id not in self.delegated:
            self.delegated.add(item.job_id)
            await emit(self.bus, DelegatedEvent(
                job_id=item.job_id, worker_id=self.worker_id, reason=reason,
                event_id=f"{item.job_id}.delegated.{self.worker_id}"))
        delay = backoff(att.delivery.num_delivered, base=0.5, cap=30.0) * (1 + random.random())
        await att.delivery.nak(delay)
        # Once it is back in the stream, ring the others' doorbell (not ours):
        # otherwise this worker's own next poll tends to win the race for it.
        self.ring_for_others(item.capability["type"], item.priority, delay + 0.05)

    async def _dead_letter(self, att: Attempt, reason: str) -> None:
        d = att.delivery
        await self.bus.dead_letter(d.stream, d.msg.subject, reason, d.msg.data,
                                   headers=d.headers, stream_seq=d.stream_seq,
                                   consumer=d.consumer, deliveries=d.num_delivered,
                                   job_id=att.job_id)
        await d.term()
