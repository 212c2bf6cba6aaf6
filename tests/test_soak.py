"""`just soak`: the soak program (`jetfleet bench soak`, ops/bench_soak.py) run
as a user runs it, at full size: 100k jobs through a whole fleet while random
workers, dispatchers, the monitor, the query service and node agents are
killed with -9, and the server is restarted once (with a cluster, one server
is restarted and another killed). Nothing lost, nothing done twice, no lease
held twice; the figures it prints are the report.

A smaller run of the same program is in the default suite, so the program
itself is known to work between soaks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def soak(tmp_path: Path, *args: str, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JETFLEET_SOAK_DIR": str(tmp_path / "soak")}
    env.pop("JETFLEET_NATS_URL", None)
    proc = subprocess.run([sys.executable, "-m", "ops.cli", "bench", "soak", "--json", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    print(json.dumps(out, indent=1))
    # The program's own verdict, and the figures behind it.
    assert proc.returncode == 0, (out.get("lost_ids"), out.get("duplicate_ids"),
                                  out.get("lease_violations"))
    assert out["all_ended"] and out["lost"] == 0 and out["duplicates"] == 0
    assert out["lease_double_holds"] == 0 and out["lease_writes"] > 0
    assert out["crashes"] == []
    assert sum(out["states"].values()) >= out["jobs"] + out["baseline_jobs"]
    return out


def test_a_short_soak_loses_and_doubles_nothing(tmp_path: Path) -> None:
    out = soak(tmp_path, "--jobs", "600", "--soak-baseline", "100", "--soak-workers", "2",
               "--soak-kill-every", "1.5", "--soak-seed", "3", timeout=600)
    assert out["kill_total"] >= 1 and len(out["server_faults"]) == 1
    assert out["server_faults"][0]["recovered_s"] is not None


@pytest.mark.soak
def test_soak_100k_jobs_with_kills_and_a_server_restart(tmp_path: Path) -> None:
    out = soak(tmp_path, "--jobs", "100000", "--soak-kill-every", "5", timeout=3600)
    kinds = {k["what"] for k in out["kills"]}
    assert {"worker", "dispatcher"} <= kinds and out["kill_total"] >= 20
    assert all(k["recovered"] == k["kills"] for k in out["kills"])


@pytest.mark.soak
def test_soak_on_a_three_server_cluster(tmp_path: Path) -> None:
    out = soak(tmp_path, "--jobs", "30000", "--soak-cluster", "3", "--soak-kill-every", "5",
               timeout=3600)
    assert [f["what"] for f in out["server_faults"]] == ["server restart", "server kill -9"]
