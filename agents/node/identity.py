"""Who this node is and what it has: the record in KV `nodes`.

The node id is `--node`, else $JETFLEET_NODE, else the host name, cleaned to
a subject token: the same name the node's workers put on the jobs they run,
so the monitor can tell which jobs die with the node. The machine id
(/etc/machine-id) is recorded beside it, stable across renames.
"""

from __future__ import annotations

import os
import platform
import socket
import time

import psutil

from agents.devices import node_name
from agents.node.gpu import GpuBackend
from bus.control import VERSION
from schemas.telemetry import NodeInventory


def clean_node_id(raw: str) -> str:
    """A valid subject token and id part: letters, digits, '-' and '_', at most 64."""
    return "".join(c if (c.isalnum() and c.isascii()) or c in "-_" else "-" for c in raw)[:64] or "node"


def node_id(configured: str | None = None) -> str:
    return clean_node_id(configured or node_name())


def machine_id() -> str | None:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value:
            return value
    return None


def addresses() -> list[str]:
    """Non-loopback IPv4 and IPv6 addresses of the node's interfaces."""
    out: list[str] = []
    try:
        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    ip = a.address.split("%")[0]
                    if not ip.startswith(("127.", "::1", "fe80")):
                        out.append(ip)
    except (OSError, psutil.Error):
        pass
    return sorted(set(out))[:32]


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def inventory(node: str, backend: GpuBackend, *, started_at: float, heartbeat_s: float,
              metrics_interval_s: float, labels: dict[str, str] | None = None,
              job_patterns: list[str] | None = None) -> NodeInventory:
    try:
        boot: float | None = psutil.boot_time()
    except (OSError, psutil.Error):
        boot = None
    return NodeInventory(
        node=node, hostname=socket.gethostname(), addresses=addresses(),
        os=f"{platform.system()} {platform.release()}", cpu_count=os.cpu_count(),
        cpu_model=cpu_model(), memory_total_mb=psutil.virtual_memory().total // (1 << 20),
        gpus=backend.inventory(), gpu_backend=backend.name,
        driver_version=backend.driver_version(), cuda_driver_version=backend.cuda_driver_version(),
        agent_pid=os.getpid(), agent_version=VERSION, started_at=started_at,
        updated_at=time.time(), heartbeat_s=heartbeat_s, metrics_interval_s=metrics_interval_s,
        labels=dict(labels or {}), simulated=backend.simulated, machine_id=machine_id(),
        boot_time=boot, architecture=platform.machine() or None,
        job_patterns=list(job_patterns or []))
