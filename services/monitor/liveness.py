"""When did this monitor last hear each node, on its own monotonic clock.

Lost-ness is decided from that time alone (never from the timestamps nodes
write, which another machine's clock produced): a node is overdue once the
monitor has not heard it for `lost_after` seconds *while it was listening*.
Time the monitor was not listening does not count against anyone: at start
every known node counts as just heard, and a stall of the monitor's own loop
or a disconnect from the server shifts every node's last-heard time forward
by as long as it lasted. The monitor then still asks the stream for the
node's latest heartbeat before deciding (see monitor.py), so a heartbeat that
reached the server but not us yet (a slow bus) saves the node.

Nodes are kept in the order they were last heard, so finding the overdue
ones costs as many steps as there are overdue nodes, not nodes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from schemas.telemetry import Heartbeat


@dataclass
class Heard:
    at: float  # monotonic time this monitor last heard the node
    started_at: float = 0.0  # the agent's start time and heartbeat number: a
    seq: int = 0  # later (started_at, seq) means the node spoke again
    interval_s: float = 5.0
    job_ids: list[str] = field(default_factory=list)
    wall: float = 0.0  # wall-clock time heard (for records and events only)
    simulated: bool = False
    hostname: str | None = None
    gpus: int = 0


class Liveness:
    def __init__(self, lost_after: float) -> None:
        self.lost_after = lost_after
        self.order: OrderedDict[str, Heard] = OrderedDict()  # listening for these
        self.silent: dict[str, Heard] = {}  # declared lost: not scanned any more

    def heard(self, node: str, hb: Heartbeat, at: float, wall: float) -> Heard:
        h = self.order.get(node) or self.silent.pop(node, None)
        if h is None:
            h = Heard(at=at)
        h.at, h.wall = at, wall
        if (hb.started_at, hb.seq) > (h.started_at, h.seq):
            h.started_at, h.seq = hb.started_at, hb.seq
        h.interval_s, h.job_ids, h.simulated = hb.interval_s, hb.job_ids, hb.simulated
        h.hostname, h.gpus = hb.hostname or h.hostname, hb.gpus
        self.order[node] = h
        self.order.move_to_end(node)
        return h

    def expect(self, node: str, at: float) -> None:
        """A node known to be alive (from the record) that we have not heard yet:
        it gets a full `lost_after` from `at` (now) before it can be overdue."""
        if node not in self.order and node not in self.silent:
            self.order[node] = Heard(at=at)

    def overdue(self, at: float) -> list[tuple[str, float]]:
        """(node, seconds silent) of every node not heard for more than lost_after."""
        out: list[tuple[str, float]] = []
        for node, h in self.order.items():
            silent = at - h.at
            if silent <= self.lost_after:
                break
            out.append((node, silent))
        return out

    def pardon(self, node: str, at: float) -> None:
        """The stream holds a newer heartbeat than we heard: the node is alive."""
        h = self.order.get(node)
        if h is not None:
            h.at = at
            self.order.move_to_end(node)

    def silence(self, node: str) -> None:
        """Declared lost: stop scanning it until it is heard again."""
        h = self.order.pop(node, None)
        if h is not None:
            self.silent[node] = h

    def listen(self, node: str, at: float) -> None:
        """Scan a node again (it recovered), from `at` (now)."""
        h = self.silent.pop(node, None)
        if h is not None:
            h.at = at
            self.order[node] = h
            self.order.move_to_end(node)

    def forget(self, node: str) -> None:
        self.order.pop(node, None)
        self.silent.pop(node, None)

    def shift(self, seconds: float) -> None:
        """The monitor was not listening for `seconds`: it counts against nobody."""
        for h in self.order.values():
            h.at += seconds

    def get(self, node: str) -> Heard | None:
        return self.order.get(node) or self.silent.get(node)

    def __len__(self) -> int:
        return len(self.order) + len(self.silent)
