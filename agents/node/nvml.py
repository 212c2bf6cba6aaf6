"""Real GPUs through NVML (`import pynvml` from the nvidia-ml-py package).

NVML is initialised once and device handles are cached. Every call may fail
on some device, driver or permission: each failure degrades only its own
field to "not available" (None, named in `unavailable`), and a field the
device does not support is not asked again. DCGM exporter's default set is
covered, plus what it lacks: per-process GPU memory (compute and graphics
processes) and per-process SM/memory/encoder/decoder utilization from
`nvmlDeviceGetProcessUtilization` since the last sample's timestamp. Under
MIG the per-process figures are hidden by the driver; samples say so in
`mig_hidden`, and each MIG device is reported with its parent's index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from agents.node.gpu import GpuSnapshot
from schemas.telemetry import GpuInventory, GpuProcessSample, GpuSample

log = logging.getLogger(__name__)
T = TypeVar("T")
MB = 1024 * 1024

# Fields MIG hides from NVML's device-level and per-process queries.
MIG_HIDDEN = ["gpu_util_pct", "mem_copy_util_pct", "process_used_memory_mb",
              "process_sm_util_pct", "process_mem_util_pct"]


class NvmlUnavailable(RuntimeError):
    def __init__(self, why: str, absent: bool) -> None:
        super().__init__(why)
        self.absent = absent  # no library or no driver: a CPU-only node, not an error


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass
class _Device:
    index: int
    handle: Any
    uuid: str | None = None
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total_mb: int | None = None
    mig_enabled: bool = False
    mig_mode: str | None = None
    compute_capability: str | None = None
    mig_parent: int | None = None  # set on MIG devices
    migs: list[_Device] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)
    last_process_ts: int = 0
    events: Any = None  # an NVML event set for XID errors, when the driver allows it
    last_xid: int = 0
    lost: bool = False


class NvmlBackend:
    name = "nvml"
    simulated = False

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise NvmlUnavailable(f"nvidia-ml-py is not installed ({exc})", absent=True) from None
        self.nv: Any = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            absent = isinstance(exc, pynvml.NVMLError_LibraryNotFound | pynvml.NVMLError_DriverNotLoaded)
            raise NvmlUnavailable(f"NVML: {exc}", absent=absent) from None
        except OSError as exc:
            raise NvmlUnavailable(f"NVML: {exc}", absent=True) from None
        self._driver = self._plain(lambda: _text(pynvml.nvmlSystemGetDriverVersion()))
        self._cuda = self._plain(self._cuda_version)
        self.devices: list[_Device] = []
        count = self._plain(pynvml.nvmlDeviceGetCount) or 0
        for i in range(int(count)):
            handle = self._plain(partial(pynvml.nvmlDeviceGetHandleByIndex, i))
            if handle is None:
                log.warning("GPU %d: no NVML handle; left out", i)
                continue
            dev = _Device(index=i, handle=handle)
            self._describe(dev)
            self.devices.append(dev)
        if not self.devices and count == 0:
            log.info("NVML loaded but sees no GPU")

    # ---- calls that may fail ------------------------------------------------------------

    def _plain(self, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except self.nv.NVMLError as exc:
            log.debug("NVML call failed: %s", exc)
            return None
        except Exception as exc:  # a binding/driver mismatch raises odd things
            log.debug("NVML call failed: %r", exc)
            return None

    def _get(self, dev: _Device, fields: tuple[str, ...], fn: Callable[[], T],
             unavailable: list[str]) -> T | None:
        """One NVML call feeding `fields`: on failure they are unavailable, and
        when the device does not support it they are not asked again."""
        key = fields[0]
        if key in dev.unsupported:
            unavailable.extend(fields)
            return None
        try:
            return fn()
        except self.nv.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code in (self.nv.NVML_ERROR_NOT_SUPPORTED, self.nv.NVML_ERROR_NO_PERMISSION,
                        getattr(self.nv, "NVML_ERROR_FUNCTION_NOT_FOUND", -1)):
                dev.unsupported.add(key)
            elif code == self.nv.NVML_ERROR_GPU_IS_LOST:
                dev.lost = True
        except Exception as exc:
            log.debug("GPU %d %s: %r", dev.index, key, exc)
        unavailable.extend(fields)
        return None

    def _cuda_version(self) -> str:
        v = int(self.nv.nvmlSystemGetCudaDriverVersion())
        return f"{v // 1000}.{(v % 1000) // 10}"

    # ---- inventory ---------------------------------------------------------------------

    def _describe(self, dev: _Device) -> None:
        nv, h = self.nv, dev.handle
        dev.uuid = self._plain(lambda: _text(nv.nvmlDeviceGetUUID(h)))
        dev.name = self._plain(lambda: _text(nv.nvmlDeviceGetName(h)))
        dev.pci_bus_id = self._plain(lambda: _text(nv.nvmlDeviceGetPciInfo(h).busId))
        mem = self._plain(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        dev.memory_total_mb = int(mem.total // MB) if mem is not None else None
        cc = self._plain(lambda: nv.nvmlDeviceGetCudaComputeCapability(h))
        dev.compute_capability = f"{cc[0]}.{cc[1]}" if cc else None
        mode = self._plain(lambda: nv.nvmlDeviceGetMigMode(h))
        if mode is not None:
            dev.mig_enabled = mode[0] == nv.NVML_DEVICE_MIG_ENABLE
            dev.mig_mode = "enabled" if dev.mig_enabled else "disabled"
        if dev.mig_enabled:
            slots = self._plain(lambda: nv.nvmlDeviceGetMaxMigDeviceCount(h)) or 0
            for m in range(int(slots)):
                mh = self._plain(partial(nv.nvmlDeviceGetMigDeviceHandleByIndex, h, m))
                if mh is None:
                    continue  # an empty MIG slot answers NOT_FOUND
                mig = _Device(index=m, handle=mh, mig_parent=dev.index, mig_enabled=True,
                              mig_mode="enabled")
                uuid = self._plain(partial(nv.nvmlDeviceGetUUID, mh))
                mig.uuid = _text(uuid) if uuid is not None else None
                name = self._plain(partial(nv.nvmlDeviceGetName, mh))
                mig.name = _text(name) if name is not None else None
                mmem = self._plain(partial(nv.nvmlDeviceGetMemoryInfo, mh))
                mig.memory_total_mb = int(mmem.total // MB) if mmem is not None else None
                mig.pci_bus_id = dev.pci_bus_id
                dev.migs.append(mig)
        try:
            events = nv.nvmlEventSetCreate()
            nv.nvmlDeviceRegisterEvents(h, nv.nvmlEventTypeXidCriticalError, events)
            dev.events = events
        except Exception as exc:  # not supported, or not allowed for this user
            log.debug("GPU %d: no XID events (%s)", dev.index, exc)

    def inventory(self) -> list[GpuInventory]:
        out: list[GpuInventory] = []
        for d in self.devices:
            out.append(GpuInventory(index=d.index, uuid=d.uuid, name=d.name,
                                    pci_bus_id=d.pci_bus_id, memory_total_mb=d.memory_total_mb,
                                    mig_mode=d.mig_mode, compute_capability=d.compute_capability,
                                    mig_devices=len(d.migs)))
            out.extend(GpuInventory(index=m.index, uuid=m.uuid, name=m.name,
                                    pci_bus_id=m.pci_bus_id, memory_total_mb=m.memory_total_mb,
                                    mig_mode="enabled", mig_parent=d.index) for m in d.migs)
        return out

    def driver_version(self) -> str | None:
        return self._driver

    def cuda_driver_version(self) -> str | None:
        return self._cuda

    # ---- sampling ----------------------------------------------------------------------

    def sample(self) -> GpuSnapshot:
        snap = GpuSnapshot()
        for dev in self.devices:
            snap.gpus.append(self._sample_device(dev))
            self._processes(dev, snap)
            for mig in dev.migs:
                snap.gpus.append(self._sample_device(mig))
                self._processes(mig, snap)
        return snap

    def _sample_device(self, dev: _Device) -> GpuSample:
        nv, h = self.nv, dev.handle
        un: list[str] = []
        s = GpuSample(index=dev.index, uuid=dev.uuid, name=dev.name, pci_bus_id=dev.pci_bus_id,
                      mig_parent=dev.mig_parent, fb_total_mb=dev.memory_total_mb)
        util = self._get(dev, ("gpu_util_pct", "mem_copy_util_pct"),
                         lambda: nv.nvmlDeviceGetUtilizationRates(h), un)
        if util is not None:
            s.gpu_util_pct, s.mem_copy_util_pct = float(util.gpu), float(util.memory)
        mem = self._get(dev, ("fb_used_mb", "fb_free_mb"), lambda: nv.nvmlDeviceGetMemoryInfo(h), un)
        if mem is not None:
            s.fb_used_mb, s.fb_free_mb = mem.used / MB, mem.free / MB
            s.fb_total_mb = mem.total / MB
        if dev.mig_parent is None:
            # Board-level counters belong to the physical GPU, not its MIG slices.
            self._board(dev, s, un)
        if dev.mig_enabled:
            s.mig_hidden = list(MIG_HIDDEN)
        if dev.lost:
            un.append("gpu_lost")
        s.unavailable = sorted(set(un))
        return s

    def _board(self, dev: _Device, s: GpuSample, un: list[str]) -> None:
        nv, h = self.nv, dev.handle
        power = self._get(dev, ("power_w",), lambda: nv.nvmlDeviceGetPowerUsage(h), un)
        s.power_w = power / 1000.0 if power is not None else None
        limit = self._get(dev, ("power_limit_w",), lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h), un)
        s.power_limit_w = limit / 1000.0 if limit is not None else None
        energy = self._get(dev, ("energy_mj",),
                           lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h), un)
        s.energy_mj = float(energy) if energy is not None else None
        temp = self._get(dev, ("gpu_temp_c",),
                         lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU), un)
        s.gpu_temp_c = float(temp) if temp is not None else None
        s.mem_temp_c = self._field_value(dev, "mem_temp_c", nv.NVML_FI_DEV_MEMORY_TEMP, un)
        sm = self._get(dev, ("sm_clock_mhz",), lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM), un)
        s.sm_clock_mhz = float(sm) if sm is not None else None
        mc = self._get(dev, ("mem_clock_mhz",),
                       lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM), un)
        s.mem_clock_mhz = float(mc) if mc is not None else None
        tx = self._get(dev, ("pcie_tx_kbps",),
                       lambda: nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES), un)
        s.pcie_tx_kbps = float(tx) if tx is not None else None
        rx = self._get(dev, ("pcie_rx_kbps",),
                       lambda: nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES), un)
        s.pcie_rx_kbps = float(rx) if rx is not None else None
        replay = self._get(dev, ("pcie_replay",), lambda: nv.nvmlDeviceGetPcieReplayCounter(h), un)
        s.pcie_replay = int(replay) if replay is not None else None
        rows = self._get(dev, ("remapped_rows_correctable", "remapped_rows_uncorrectable"),
                         lambda: nv.nvmlDeviceGetRemappedRows(h), un)
        if rows is not None:
            s.remapped_rows_correctable, s.remapped_rows_uncorrectable = int(rows[0]), int(rows[1])
        sbe = self._get(dev, ("ecc_sbe_volatile",), lambda: nv.nvmlDeviceGetTotalEccErrors(
            h, nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_VOLATILE_ECC), un)
        s.ecc_sbe_volatile = int(sbe) if sbe is not None else None
        dbe = self._get(dev, ("ecc_dbe_volatile",), lambda: nv.nvmlDeviceGetTotalEccErrors(
            h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC), un)
        s.ecc_dbe_volatile = int(dbe) if dbe is not None else None
        enc = self._get(dev, ("enc_util_pct",), lambda: nv.nvmlDeviceGetEncoderUtilization(h), un)
        s.enc_util_pct = float(enc[0]) if enc is not None else None
        dec = self._get(dev, ("dec_util_pct",), lambda: nv.nvmlDeviceGetDecoderUtilization(h), un)
        s.dec_util_pct = float(dec[0]) if dec is not None else None
        s.xid_errors = self._xid(dev, un)

    def _field_value(self, dev: _Device, name: str, field_id: int, un: list[str]) -> float | None:
        values = self._get(dev, (name,), lambda: self.nv.nvmlDeviceGetFieldValues(
            dev.handle, [field_id]), un)
        if values is None:
            return None
        v = values[0]
        if v.nvmlReturn != self.nv.NVML_SUCCESS:
            un.append(name)
            return None
        kind = v.valueType
        nv = self.nv
        raw = (v.value.dVal if kind == nv.NVML_VALUE_TYPE_DOUBLE else
               v.value.uiVal if kind == nv.NVML_VALUE_TYPE_UNSIGNED_INT else
               v.value.ulVal if kind == nv.NVML_VALUE_TYPE_UNSIGNED_LONG else
               v.value.ullVal if kind == nv.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG else
               v.value.sllVal if kind == nv.NVML_VALUE_TYPE_SIGNED_LONG_LONG else
               v.value.siVal)
        return float(raw)

    def _xid(self, dev: _Device, un: list[str]) -> int | None:
        """The last XID error seen (as DCGM reports it); None when events are not allowed."""
        if dev.events is None:
            un.append("xid_errors")
            return None
        for _ in range(64):  # drain what queued since the last sample, without waiting
            try:
                data = self.nv.nvmlEventSetWait_v2(dev.events, 0)
            except self.nv.NVMLError:
                break  # NVML_ERROR_TIMEOUT: nothing more
            except Exception:
                break
            if data.eventType & self.nv.nvmlEventTypeXidCriticalError:
                dev.last_xid = int(data.eventData)
        return dev.last_xid

    def _processes(self, dev: _Device, snap: GpuSnapshot) -> None:
        """Compute and graphics processes (de-duplicated), with their memory and,
        outside MIG, their utilization since the last sample."""
        nv, h = self.nv, dev.handle
        un: list[str] = []
        found: dict[int, GpuProcessSample] = {}
        for kind, fn in (("compute", nv.nvmlDeviceGetComputeRunningProcesses),
                         ("graphics", nv.nvmlDeviceGetGraphicsRunningProcesses)):
            procs = self._get(dev, (f"{kind}_processes",), partial(fn, h), un) or []
            for p in procs:
                pid = int(p.pid)
                used = getattr(p, "usedGpuMemory", None)
                mb = used / MB if isinstance(used, int) and not dev.mig_enabled else None
                have = found.get(pid)
                if have is None:
                    found[pid] = GpuProcessSample(
                        pid=pid, gpu_index=dev.index if dev.mig_parent is None else dev.mig_parent,
                        gpu_uuid=dev.uuid, used_memory_mb=mb, kind=kind)  # type: ignore[arg-type]
                else:
                    have.kind = "both"
                    if mb is not None:
                        have.used_memory_mb = max(have.used_memory_mb or 0.0, mb)
        if found and not dev.mig_enabled:
            samples = self._utilization(dev)
            for pid, sample in samples.items():
                p = found.get(pid)
                if p is not None:
                    p.sm_util_pct = float(sample.smUtil)
                    p.mem_util_pct = float(sample.memUtil)
                    p.enc_util_pct = float(sample.encUtil)
                    p.dec_util_pct = float(sample.decUtil)
        snap.processes.extend(found.values())

    def _utilization(self, dev: _Device) -> dict[int, Any]:
        """Per-process utilization samples newer than the last ones read."""
        nv = self.nv
        if "process_utilization" in dev.unsupported:
            return {}
        try:
            samples = nv.nvmlDeviceGetProcessUtilization(dev.handle, dev.last_process_ts)
        except nv.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_NO_PERMISSION):
                dev.unsupported.add("process_utilization")
            return {}  # NVML_ERROR_NOT_FOUND: no sample since the timestamp
        except Exception:
            return {}
        latest: dict[int, Any] = {}
        for smp in samples:
            ts = int(smp.timeStamp)
            dev.last_process_ts = max(dev.last_process_ts, ts)
            have = latest.get(int(smp.pid))
            if have is None or int(have.timeStamp) < ts:
                latest[int(smp.pid)] = smp
        return latest

    def close(self) -> None:
        for dev in self.devices:
            if dev.events is not None:
                self._plain(partial(self.nv.nvmlEventSetFree, dev.events))
        self._plain(self.nv.nvmlShutdown)
