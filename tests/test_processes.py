"""Whole processes: kill -9 a worker mid-job, stop `jetfleet up`, follow a trace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.conftest import ROOT
from tests.helpers import eventually, job_events, running_attempt, state_is


async def test_kill_9_worker_mid_job_is_redelivered_and_succeeds_once(bus, client, procs):
    procs.run("dispatcher")
    first = procs.run("worker", "--node", "n1", name="worker-a")
    job_id = await client.submit("sleep", {"seconds": 4, "steps": 4})
    running = await eventually(lambda: state_is(client, job_id, "running"), timeout=30)
    assert running.attempt == 1
    second = procs.run("worker", "--node", "n2", name="worker-b")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    t_killed = time.monotonic()
    again = await eventually(
        lambda: running_attempt(client, job_id, 2), timeout=30, what="attempt 2 running")
    # Redelivered after the ack wait (3 s in tests) and running again well within 15 s.
    assert time.monotonic() - t_killed < 15
    assert again.worker_id != running.worker_id
    state = await client.wait(job_id, timeout=30)
    assert state.state == "succeeded"
    events = await job_events(bus, job_id)
    kinds = [e["kind"] for e in events]
    assert kinds.count("succeeded") == 1
    assert kinds.count("lost") == 1
    lost = next(e for e in events if e["kind"] == "lost")
    assert lost["attempt"] == 1 and lost["worker_id"] == running.worker_id
    assert [a.outcome for a in state.attempts] == ["lost", "succeeded"]
    assert second.poll() is None


def _start_up(tmp_path, *args):
    """`jetfleet up` in a child; returns it and its NATS URL once it says it is up."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "up", "--data-dir", str(tmp_path / "fleet"), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    line = ""
    deadline = time.monotonic() + 30
    while "nats at" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
    assert "nats at" in line, line
    return proc, line.split("nats at ")[1].split(",")[0]


def test_up_stops_cleanly_on_sigint_and_leaves_no_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc, url = _start_up(tmp_path, "--workers", "2")
    deadline = time.monotonic() + 30
    # Wait until both workers advertise, so there really are children to stop
    # (`up` also starts the kernel evolver, which advertises kernel.* only).
    def echo_workers(out: str) -> int:
        if not out.strip().startswith("["):
            return 0
        return sum(1 for w in json.loads(out)
                   if any(c.get("type") == "echo" for c in w["capabilities"]))

    out = ""
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-m", "ops.cli", "--nats", url, "workers", "--json"],
                             env=env, capture_output=True, text=True, cwd=ROOT).stdout
        if echo_workers(out) == 2:
            break
        time.sleep(0.3)
    assert echo_workers(out) == 2
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3  # dispatcher and two workers
    server_pids = [p.pid for p in psutil.process_iter(["cmdline"])
                   if "nats-server" in " ".join(p.info["cmdline"] or [])
                   and str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "jetfleet stopped" in rest
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [p.pid for p in alive]
    assert server_pids and not any(psutil.pid_exists(p) for p in server_pids)


async def test_one_trace_spans_submit_dispatch_and_execution(tmp_path, procs):
    spans_file = tmp_path / "spans.jsonl"
    env = {"JETFLEET_OTEL_EXPORTER": f"jsonl:{spans_file}"}
    procs.run("dispatcher", env=env)
    procs.run("worker", env=env)
    result = procs.cli("submit", "echo", "--payload", '{"t": 1}', "--wait", "--json",
                       "--wait-timeout", "30", env=env)
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["job_id"]

    def spans_of_job():
        if not spans_file.exists():
            return None
        spans = [json.loads(line) for line in spans_file.read_text().splitlines() if line]
        runs = [s for s in spans if s["attributes"].get("jetfleet.job_id") == job_id
                and s["service"] == "jetfleet-worker"]
        if not runs:
            return None
        trace_id = runs[0]["trace_id"]
        return [s for s in spans if s["trace_id"] == trace_id]

    import asyncio

    deadline = time.monotonic() + 20
    spans = None
    while time.monotonic() < deadline and not spans:
        spans = spans_of_job()
        await asyncio.sleep(0.2)
    assert spans, "no worker span for the job"
    services = {s["service"] for s in spans}
    assert {"jetfleet-cli", "jetfleet-dispatcher", "jetfleet-worker"} <= services, services
    names = {s["name"] for s in spans}
    assert "dispatch" in names and "run echo" in names
    assert any(s["attributes"].get("messaging.system") == "nats" for s in spans)


def test_up_killed_with_9_takes_its_children_and_server_along(tmp_path):
    proc, _url = _start_up(tmp_path)
    time.sleep(2)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert any("nats-server" in " ".join(p.cmdline()) for p in family)
    assert len(family) >= 3  # server, dispatcher, worker (and the evolver)
    proc.kill()
    proc.wait(timeout=10)
    _gone, alive = psutil.wait_procs(family, timeout=20)
    assert not alive, [p.cmdline() for p in alive]


def test_cli_refuses_bad_options_with_a_clear_message(procs):
    cases = [
        (["submit", "echo", "--priority", "5"], "priority"),
        (["submit", "echo", "--resource", "gpus=abc"], "whole numbers"),
        (["submit", "echo", "--resource", "gpus"], "key=value"),
        (["submit", "echo", "--payload", "[1]"], "JSON object"),
        (["submit", "echo", "--payload", "{nope"], "not valid JSON"),
        (["submit", "Bad Type"], "capability type"),
    ]
    for argv, fragment in cases:
        result = procs.cli(*argv, timeout=30)
        assert result.returncode != 0, argv
        assert fragment in result.stderr, (argv, result.stderr)
        assert "Traceback" not in result.stderr, (argv, result.stderr)
    missing = procs.cli("status", "no-such-job")
    assert missing.returncode == 1 and "no job no-such-job" in missing.stderr
