"""`jetfleet simulate`: a simulated fleet whose every record says simulated,
with nodes that go silent and come back; and `jetfleet nodes` over it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from bus import topology
from tests.conftest import ROOT, eventually
from tests.helpers import stored


def _simulate(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ops.cli", "simulate", *args], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def _all(bus, stream: str, subjects: str) -> list[tuple[str, dict]]:
    return [(m.subject, json.loads(m.data)) for m in await stored(bus, subjects, stream)]


async def test_a_simulated_fleet_says_simulated_everywhere_and_flaps(bus, procs, fleet_env):
    procs.run("monitor", "--lost-after", "1.5", name="monitor")
    sim = _simulate(fleet_env, "--nodes", "12", "--gpus", "2", "--interval", "0.3",
                    "--metrics-every", "3", "--flap", "40", "--silence", "3", "--duration", "9",
                    "--prefix", "ts")
    out, _ = await asyncio.to_thread(sim.communicate, timeout=60)
    assert sim.returncode == 0, out
    assert "simulate: done" in out

    inventories = [json.loads(v) for _, v in await _kv(bus, topology.KV_NODES)]
    assert len(inventories) == 12
    assert all(i["simulated"] and len(i["gpus"]) == 2 and all(g["simulated"] for g in i["gpus"])
               for i in inventories)
    telemetry = await _all(bus, topology.TELEMETRY, topology.TELEMETRY_ALL)
    kinds = {s.split(".")[2] for s, _ in telemetry}
    assert kinds == {"heartbeat", "gpu", "procs", "jobs"}
    assert all(m["simulated"] for _, m in telemetry)
    gpu = [m for s, m in telemetry if s.endswith(".gpu")]
    assert all(g["simulated"] for m in gpu for g in m["gpus"])
    assert all(p["simulated"] for m in gpu for p in m.get("processes", []))
    assert all(p["simulated"] for s, m in telemetry if s.endswith(".procs")
               for p in m["processes"])
    jobs = [json.loads(v) for _, v in await _kv(bus, topology.KV_JOBS)]
    assert len(jobs) >= 24
    assert all(j["origin"] == "discovered" and j["process"]["simulated"]
               and j["labels"] == {"simulated": "true"} for j in jobs)

    # Some nodes went silent for longer than --lost-after and came back.
    events = [m for _, m in await _all(bus, topology.EVENTS, topology.NODE_EVENTS_ALL)]
    lost = {e["node"] for e in events if e["kind"] == "lost"}
    assert lost, "no simulated node was ever lost"
    assert all(e["simulated"] for e in events if e["kind"] in ("lost", "recovered", "joined"))
    recovered = {e["node"] for e in events if e["kind"] == "recovered"}
    assert recovered, "no simulated node came back"

    # `jetfleet nodes` over the simulated fleet.
    listing = await asyncio.to_thread(procs.cli, "nodes", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert len(rows) == 12 and all(r["simulated"] and len(r["gpus"]) == 2 for r in rows)
    assert {r["state"] for r in rows} <= {"alive", "lost"}
    # The simulator stopped, so every node falls silent: the monitor loses them all.
    await eventually(lambda: _all_lost(procs), timeout=20, what="every stopped node lost")
    table = await asyncio.to_thread(procs.cli, "nodes")
    assert table.returncode == 0 and "ts-00000" in table.stdout and "lost" in table.stdout


async def _kv(bus, bucket: str) -> list[tuple[str, bytes]]:
    kv = await bus.kv(bucket)
    out = []
    for key in await kv.keys():
        entry = await kv.get(key)
        if entry.value:
            out.append((key, entry.value))
    return out


async def _all_lost(procs) -> bool:
    r = await asyncio.to_thread(procs.cli, "nodes", "--json", "--state", "alive")
    return r.returncode == 0 and json.loads(r.stdout) == []


def test_bad_options_are_one_line_errors(procs):
    for args, words in ((("simulate", "--nodes", "0"), "--nodes"),
                        (("simulate", "--prefix", "a.b"), "--prefix"),
                        (("simulate", "--interval", "0"), "--interval"),
                        (("run", "agent", "--heartbeat", "0"), "--heartbeat"),
                        (("run", "agent", "--job-pattern", "(x"), "job pattern"),
                        (("run", "monitor", "--lost-after", "-1"), "--lost-after")):
        r = procs.cli(*args, timeout=30)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr
    r = procs.cli("nodes", "--nats", "nats://127.0.0.1:1", "--connect-timeout", "0.5", timeout=30)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
