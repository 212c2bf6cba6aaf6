"""What node agents say about their machines: inventory, heartbeats, GPU and
process metrics, the processes they discover, and node lifecycle events.

    KV `nodes`, key <node>                 NodeInventory
    KV `node_states`, key <node>           NodeStatus (the monitors' verdict: alive or lost)
    telemetry.<node>.heartbeat             Heartbeat
    telemetry.<node>.gpu                   GpuMetrics (DCGM's default set, plus per-process)
    telemetry.<node>.procs                 ProcessMetrics
    telemetry.<node>.jobs                  DiscoveredJobs (what the agent tracks this cycle)
    events.nodes.<node>                    NodeEvent (joined, lost, recovered, app_*)

Every metric may be absent: NVML calls fail per field on some devices and
drivers, and an absent field is `None` (listed in `unavailable`), never a
made-up zero. A simulated device or node says `simulated: true` everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from schemas.common import SCHEMA_VERSION, ObjRef, Struct, now

# ---- processes -------------------------------------------------------------------------------


class ProcessInfo(Struct, kw_only=True):
    """A process the agent found, as captured once: secrets redacted, code size-capped."""

    pid: int
    create_time: float = 0.0
    cmdline: list[str] = []
    exe: str | None = None
    cwd: str | None = None
    username: str | None = None
    # torch, deepspeed, accelerate, jax, tensorflow, ... (a guess from argv and imports).
    framework: str | None = None
    # --lr 0.01 --batch-size 32 -> {"lr": "0.01", "batch_size": "32"}; bare flags -> "true".
    parameters: dict[str, str] = {}
    # Allow-listed variables only, secret-looking values redacted.
    env: dict[str, str] = {}
    script: str | None = None
    code: str | None = None
    code_ref: ObjRef | None = None
    code_truncated: bool = False
    imports: list[str] = []
    config_path: str | None = None
    config: str | None = None
    config_ref: ObjRef | None = None
    gpus: list[str] = []  # GPU UUIDs (or indices) it holds memory on
    # JETFLEET_JOB_ID from its environment: a process of a submitted job.
    job_id: str | None = None
    notes: list[str] = []  # what could not be read, and why
    ppid: int | None = None
    # argv longer than the capture limit: `cmdline` holds its head only.
    cmdline_truncated: bool = False
    config_truncated: bool = False
    # Made up by the fleet simulator, not found on a machine.
    simulated: bool = False


class ProcessLink(Struct, kw_only=True):
    """A process seen working for a submitted job (JETFLEET_JOB_ID in its environment)."""

    node: str
    pid: int
    create_time: float = 0.0
    cmdline: list[str] = []
    seen_at: float = msgspec.field(default_factory=now)


class ProcessSample(Struct, kw_only=True):
    pid: int
    create_time: float = 0.0
    job_id: str | None = None
    status: str | None = None
    cpu_percent: float | None = None
    rss_mb: float | None = None
    vms_mb: float | None = None
    threads: int | None = None
    open_files: int | None = None
    gpu_memory_mb: float | None = None
    gpus: list[str] = []
    ppid: int | None = None
    name: str | None = None
    # The job's own process (False: a child of it, such as a torchrun rank or a loader).
    root: bool = True
    simulated: bool = False


class ProcessMetrics(Struct, kw_only=True):
    schema: int = SCHEMA_VERSION
    node: str
    ts: float = msgspec.field(default_factory=now)
    processes: list[ProcessSample] = []
    simulated: bool = False


class DiscoveredRef(Struct, kw_only=True):
    job_id: str
    pid: int
    create_time: float = 0.0
    origin: Literal["submitted", "discovered"] = "discovered"
    gpus: list[str] = []
    processes: int = 1  # the job's process and its children


class DiscoveredJobs(Struct, kw_only=True):
    """The jobs the agent tracks on its node this cycle (both origins)."""

    schema: int = SCHEMA_VERSION
    node: str
    ts: float = msgspec.field(default_factory=now)
    jobs: list[DiscoveredRef] = []
    simulated: bool = False


# ---- GPUs -------------------------------------------------------------------------------------


class GpuInventory(Struct, kw_only=True):
    index: int
    uuid: str | None = None
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total_mb: int | None = None
    # "enabled" / "disabled" / None when NVML cannot say.
    mig_mode: str | None = None
    compute_capability: str | None = None
    simulated: bool = False
    # MIG devices under this GPU (when MIG is enabled).
    mig_devices: int = 0
    # A MIG device: the index of the physical GPU it is carved from.
    mig_parent: int | None = None


class GpuSample(Struct, kw_only=True):
    """One GPU at one instant: DCGM exporter's default counters where NVML has them."""

    index: int
    uuid: str | None = None
    name: str | None = None
    pci_bus_id: str | None = None
    gpu_util_pct: float | None = None
    mem_copy_util_pct: float | None = None
    fb_used_mb: float | None = None
    fb_free_mb: float | None = None
    fb_total_mb: float | None = None
    power_w: float | None = None
    energy_mj: float | None = None  # total since driver load (a counter)
    gpu_temp_c: float | None = None
    mem_temp_c: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    pcie_tx_kbps: float | None = None
    pcie_rx_kbps: float | None = None
    pcie_replay: int | None = None
    xid_errors: int | None = None  # the last XID seen, as DCGM reports it
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    ecc_sbe_volatile: int | None = None
    ecc_dbe_volatile: int | None = None
    enc_util_pct: float | None = None
    dec_util_pct: float | None = None
    # Fields NVML did not give on this device (not supported, no permission, error).
    unavailable: list[str] = []
    # Fields MIG hides (per-process memory and utilization).
    mig_hidden: list[str] = []
    simulated: bool = False
    # A MIG device: the index of its physical GPU (`index` is then its MIG index).
    mig_parent: int | None = None
    power_limit_w: float | None = None


class GpuProcessSample(Struct, kw_only=True):
    """What DCGM lacks: one process's share of one GPU."""

    pid: int
    gpu_index: int
    gpu_uuid: str | None = None
    used_memory_mb: float | None = None
    sm_util_pct: float | None = None
    mem_util_pct: float | None = None
    enc_util_pct: float | None = None
    dec_util_pct: float | None = None
    job_id: str | None = None
    kind: Literal["compute", "graphics", "both"] = "compute"
    simulated: bool = False


class GpuMetrics(Struct, kw_only=True):
    schema: int = SCHEMA_VERSION
    node: str
    hostname: str | None = None
    driver: str | None = None
    ts: float = msgspec.field(default_factory=now)
    gpus: list[GpuSample] = []
    processes: list[GpuProcessSample] = []
    simulated: bool = False


# ---- the node ---------------------------------------------------------------------------------


class NodeInventory(Struct, kw_only=True):
    """The value of key <node> in KV `nodes`: what the machine is, and who reports it."""

    schema: int = SCHEMA_VERSION
    node: str
    hostname: str
    addresses: list[str] = []
    os: str | None = None
    cpu_count: int | None = None
    cpu_model: str | None = None
    memory_total_mb: int | None = None
    gpus: list[GpuInventory] = []
    # "nvml" (real GPUs), "absent" (CPU-only node), "simulated", or "error: ..."
    gpu_backend: str = "absent"
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    agent_pid: int = 0
    agent_version: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    heartbeat_s: float = 5.0
    metrics_interval_s: float = 10.0
    labels: dict[str, str] = {}
    simulated: bool = False
    machine_id: str | None = None
    boot_time: float | None = None
    architecture: str | None = None
    # What makes a process a job here (regular expressions over its command line).
    job_patterns: list[str] = []


class Heartbeat(Struct, kw_only=True):
    schema: int = SCHEMA_VERSION
    node: str
    ts: float = msgspec.field(default_factory=now)
    seq: int = 0
    agent_pid: int = 0
    started_at: float = 0.0
    interval_s: float = 5.0
    load1: float | None = None
    cpu_percent: float | None = None
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    gpus: int = 0
    jobs: int = 0  # running jobs the agent tracks (both origins)
    # Telemetry messages waiting to go out (the bus was away).
    backlog: int = 0
    simulated: bool = False
    hostname: str | None = None
    # The running jobs the agent tracks (both origins), at most MAX_HEARTBEAT_JOBS.
    job_ids: list[str] = []
    # Seconds the current sampling cycle has run past its interval (a stuck
    # NVML call, say); None while sampling keeps up.
    sampling_late_s: float | None = None


MAX_HEARTBEAT_JOBS = 1000


# ---- node events ------------------------------------------------------------------------------


class NodeStatus(Struct, kw_only=True):
    """The value of key <node> in KV `node_states`: what the monitors decided.

    Written only on a change (joined, lost, recovered) under compare-and-set,
    so of several monitors exactly one makes each change and emits its event.
    """

    schema: int = SCHEMA_VERSION
    node: str
    state: Literal["alive", "lost"] = "alive"
    since: float = msgspec.field(default_factory=now)
    joined_at: float = 0.0
    # Wall-clock time the deciding monitor last heard the node (informational:
    # lost-ness is decided on the monitor's own monotonic clock).
    last_heard: float = 0.0
    changes: int = 0  # lost/recovered transitions so far
    jobs: list[str] = []  # lost: the jobs marked lost with it
    leases: list[str] = []  # lost: the lease keys reclaimed
    monitor: str | None = None
    hostname: str | None = None
    simulated: bool = False
    # The change's event and its effects (jobs lost or resumed, leases freed) are
    # done; a monitor that finds False on an older change finishes it.
    announced: bool = False



class NodeEventBase(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="kind"):
    schema: int = SCHEMA_VERSION
    event_id: str = ""
    node: str
    ts: float = msgspec.field(default_factory=now)


class NodeJoined(NodeEventBase, tag="joined"):
    hostname: str | None = None
    gpus: int = 0
    simulated: bool = False
    monitor: str | None = None


class NodeLost(NodeEventBase, tag="lost"):
    last_heard: float = 0.0
    silent_s: float = 0.0
    jobs: list[str] = []
    leases: list[str] = []
    reason: str = ""
    monitor: str | None = None
    simulated: bool = False


class NodeRecovered(NodeEventBase, tag="recovered"):
    silent_s: float = 0.0
    jobs: list[str] = []
    monitor: str | None = None
    simulated: bool = False


class AppStarted(NodeEventBase, tag="app_started"):
    app: str
    worker_id: str | None = None
    pid: int | None = None
    reason: str = ""
    start_s: float | None = None
    # When the agent spawned it (start_s later it advertised its capabilities),
    # and the seconds each @app.on_start hook took (`on_start:<function>`), part of start_s.
    spawned_at: float | None = None
    hooks_s: dict[str, float] = {}


class AppStopped(NodeEventBase, tag="app_stopped"):
    app: str
    worker_id: str | None = None
    pid: int | None = None
    reason: str = ""
    idle_s: float | None = None


class AppFailed(NodeEventBase, tag="app_failed"):
    app: str
    error: str
    restarts: int = 0
    retry_in_s: float | None = None
    details: dict[str, Any] | None = None


NodeEvent = NodeJoined | NodeLost | NodeRecovered | AppStarted | AppStopped | AppFailed

_node_event_decoder = msgspec.json.Decoder(NodeEvent)


def decode_node_event(data: bytes) -> NodeEvent:
    event: NodeEvent = _node_event_decoder.decode(data)
    return event


def node_event_kind(event: NodeEvent) -> str:
    kind = type(event).__struct_config__.tag
    assert isinstance(kind, str)
    return kind
