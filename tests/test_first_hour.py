"""The first hour of a new user: every command answers, nothing hangs, one fleet
never touches another. Each test drives the real CLI (a subprocess) or the SDK
against a real nats-server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.conftest import ROOT
from tests.helpers import eventually, job_events, state_is


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JETFLEET_LOG": "WARNING", **extra}


def _cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], env=env or _env(),
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT)


def _one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def _up(tmp: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "up", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, start_new_session=True)
    assert proc.stdout is not None
    line, deadline = "", time.monotonic() + 60
    while "nats at" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "nats at" in line, line
    return proc, line.split("nats at ")[1].split(",")[0]


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    return out


# ---- 1. one fleet never touches another ------------------------------------------------


def test_up_refuses_a_port_in_use_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _cli("up", "--data-dir", str(tmp_path / "d2"), "--nats-port", str(port),
                   timeout=30)
    assert out.returncode == 2
    line = _one_line_error(out)
    assert f"port {port} is already in use" in line and "--nats nats://127.0.0.1:" in line
    assert not (tmp_path / "d2" / "logs").exists(), "nothing was started"


def test_two_fleets_on_one_server_stop_independently(tmp_path: Path) -> None:
    a, url = _up(tmp_path, "--data-dir", str(tmp_path / "a"))
    b = None
    loner = None
    try:
        b, url_b = _up(tmp_path, "--data-dir", str(tmp_path / "b"), "--nats", url)
        assert url_b == url
        loner = subprocess.Popen([sys.executable, "-m", "ops.cli", "run", "worker",
                                  "--no-kernels"], env=_env(JETFLEET_NATS_URL=url),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 cwd=ROOT, start_new_session=True)
        # Fleet a's components and server: its direct children (a component's own
        # short-lived helpers, such as a probe at start, may end by themselves).
        a_children = psutil.Process(a.pid).children()
        b_children = psutil.Process(b.pid).children(recursive=True)
        time.sleep(3)
        out = _stop(b)
        assert "jetfleet stopped" in out
        _gone, alive = psutil.wait_procs(b_children, timeout=20)
        assert not alive
        time.sleep(2)
        stopped = [p.pid for p in a_children
                   if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE]
        assert not stopped, f"fleet a lost processes {stopped} when fleet b stopped"
        assert len(a_children) >= 7  # the server and six components
        assert loner.poll() is None, "a separately started worker stayed up"
        # Fleet a still works end to end.
        res = _cli("submit", "echo", "--payload", '{"still": "here"}', "--wait", "--json",
                   env=_env(JETFLEET_NATS_URL=url))
        assert res.returncode == 0 and json.loads(res.stdout)["result"] == {"still": "here"}
    finally:
        if loner is not None and loner.poll() is None:
            os.killpg(loner.pid, signal.SIGKILL)
            loner.wait()
        if b is not None and b.poll() is None:
            _stop(b)
        _stop(a)


# ---- 2. every command answers ----------------------------------------------------------


def test_an_unreachable_server_fails_within_the_connect_timeout() -> None:
    for argv in (["--nats", "nats://127.0.0.1:1", "workers"],
                 ["workers", "--nats", "nats://127.0.0.1:1", "--connect-timeout", "1"],
                 ["jobs", "--json", "--nats", "nats://127.0.0.1:1"]):
        t0 = time.monotonic()
        out = _cli(*argv, timeout=30)
        assert time.monotonic() - t0 < 12, argv
        assert out.returncode == 2
        line = _one_line_error(out)
        assert "nats://127.0.0.1:1" in line and "jetfleet up" in line, line


# ---- 3. waiting ends on every state a job cannot leave by itself ------------------------


async def test_submit_wait_reports_unschedulable_and_timeouts(procs) -> None:
    procs.run("dispatcher", "--unschedulable-after", "1")
    procs.run("worker", "--no-kernels", "--simulate-gpus", "1")
    await asyncio.sleep(2)
    t0 = time.monotonic()
    out = await asyncio.to_thread(procs.cli, "submit", "nosuchcap", "--wait", timeout=60)
    assert out.returncode == 3, (out.stdout, out.stderr)
    first = out.stdout.splitlines()[0]
    assert first.startswith("submitted j-"), "the id comes first"
    assert "unschedulable" in out.stdout and "no live worker advertises" in out.stdout
    assert time.monotonic() - t0 < 30
    big = await asyncio.to_thread(procs.cli, "submit", "sleep", "--resource", "gpus=64",
                                  "--wait", timeout=60)
    assert big.returncode == 3 and "gpus=64" in big.stdout
    slow = await asyncio.to_thread(procs.cli, "submit", "sleep", "--payload",
                                   '{"seconds": 30}', "--wait", "--wait-timeout", "2",
                                   timeout=60)
    assert slow.returncode == 4
    assert "is still running after 2s" in _one_line_error(slow)


async def test_a_kernel_evolve_whose_children_cannot_run_fails_with_their_reason(
        nats_server, procs) -> None:
    from agents.kernels.sdk import KernelClient

    procs.run("dispatcher", "--unschedulable-after", "1")
    procs.run("worker", "--capacity", "2")  # a CPU worker: backend=cpu
    procs.run("evolver")
    fleet = await asyncio.to_thread(KernelClient, nats_server.url)
    try:
        job_id = await asyncio.to_thread(fleet.submit_job, op_name="softmax", job_type="evolve",
                                         backend="cuda", arch="h100", max_rounds=1,
                                         parallel_num=1)
        status = await asyncio.to_thread(fleet.wait_for_completion, job_id, 120)
    finally:
        await asyncio.to_thread(fleet.close)
    assert status["status"] == "failed", status
    assert status["error"]["code"] == "children_unschedulable"
    assert "arch=h100" in status["error"]["message"]


# ---- 5. the capability example, and bad --app specs ------------------------------------


def test_a_bad_app_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "fine.py").write_text("x = 1\n")
    cases = [("nosuchmodule:app", "no module named 'nosuchmodule'"),
             ("fine:app", "has no attribute 'app'"),
             ("fine:x", "is a int, not an agents.worker.App"),
             ("broken:app", "RuntimeError: boom at import"),
             ("noattr", "expected MODULE:ATTR")]
    for spec, fragment in cases:
        out = _cli("run", "worker", "--app", spec, cwd=tmp_path, timeout=60,
                   env=_env(JETFLEET_NATS_URL="nats://127.0.0.1:1"))
        assert out.returncode == 2, (spec, out.stderr)
        assert fragment in _one_line_error(out), (spec, out.stderr)


async def test_a_capability_needing_a_gpu_on_a_gpu_less_fleet_is_unschedulable_not_bounced(
        bus, components, client) -> None:
    from agents.worker import App, JobContext

    app = App()

    @app.capability(type="chat", gpus=1)
    async def chat(ctx: JobContext) -> str:
        return "never"

    await components.dispatcher(unschedulable_after_s=60)
    await components.worker(app)  # no GPUs
    await asyncio.sleep(1)
    job = await client.submit("chat", {})
    state = await eventually(lambda: state_is(client, job, "unschedulable"), timeout=15)
    assert "gpus=1" in state.reason
    await asyncio.sleep(3)
    kinds = [e["kind"] for e in await job_events(bus, job)]
    assert "delegated" not in kinds and "running" not in kinds, kinds


# ---- 6. and 7. ids, unknown jobs, --nats anywhere -------------------------------------


async def test_unknown_and_bad_job_ids_and_ended_jobs_are_one_line(nats_server, procs) -> None:
    procs.run("dispatcher")
    procs.run("worker", "--no-kernels")
    bad = await asyncio.to_thread(procs.cli, "status", "bad id!")
    assert bad.returncode == 2 and "is not a job id" in _one_line_error(bad)
    missing = await asyncio.to_thread(procs.cli, "cancel", "j-doesnotexist")
    assert missing.returncode == 1 and _one_line_error(missing) == \
        "jetfleet: no job j-doesnotexist"
    done = await asyncio.to_thread(procs.cli, "submit", "echo", "--wait", "--json",
                                   "--job-id", "j-finished")
    assert done.returncode == 0
    again = await asyncio.to_thread(procs.cli, "cancel", "j-finished")
    assert again.returncode == 1 and "had already ended (succeeded)" in _one_line_error(again)
    # --nats after the verb, --json anywhere; every listing's --json is a list.
    env = {"JETFLEET_NATS_URL": ""}
    for verb in ("jobs", "workers", "leases"):
        out = await asyncio.to_thread(procs.cli, verb, "--nats", nats_server.url, "--json",
                                      env=env)
        assert out.returncode == 0, out.stderr
        assert isinstance(json.loads(out.stdout), list), verb
    state = await asyncio.to_thread(procs.cli, "jobs", "--state", "bogus")
    assert state.returncode == 2 and "invalid choice: 'bogus'" in state.stderr


# ---- 8. output fits a person -----------------------------------------------------------


async def test_job_ids_are_never_cut_at_80_columns(nats_server, procs) -> None:
    procs.run("dispatcher")
    procs.run("worker", "--no-kernels")
    long_id = "a-rather-long-job-id-" + "x" * 60
    out = await asyncio.to_thread(procs.cli, "submit", "echo", "--job-id", long_id, "--wait")
    assert out.returncode == 0
    table = await asyncio.to_thread(procs.cli, "jobs", env={"COLUMNS": "80"})
    assert long_id in table.stdout.replace("\n", "").replace(" ", "").replace("│", ""), \
        table.stdout


def test_every_option_has_help_text() -> None:
    from ops.cli import build_parser

    def walk(p: argparse.ArgumentParser, where: str) -> list[str]:
        missing = [f"{where} {a.option_strings or a.dest}" for a in p._actions
                   if not a.help and a.dest != "help" and not isinstance(
                       a, argparse._SubParsersAction)]
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    missing += walk(sp, f"{where} {name}")
        return missing

    assert walk(build_parser(), "jetfleet") == []


def test_a_long_result_prints_a_summary(capsys) -> None:
    from ops.commands.render import show_state
    from schemas.jobs import JobState

    cands = [{"id": f"r1c{i}", "round": 1, "island": i % 2, "parent": None,
              "outcome": "pass", "speedup": 1.5 + i, "timings": {"candidate_ms": 2.0},
              "source": "x = 1\n" * 400} for i in range(6)]
    state = JobState(job_id="j-evolve", state="succeeded", capability={"type": "kernel.evolve"},
                     result={"generator": "template", "candidates": cands,
                             "best": {"id": "r1c5", "outcome": "pass", "speedup": 6.5,
                                      "source": "x = 1\n"}})
    show_state(state, as_json=False)
    shown = capsys.readouterr().out
    assert len(shown) < 4000 and "r1c5" in shown and "6.5x" in shown
    assert "x = 1\nx = 1" not in shown, "kernel sources are not dumped"
    best = Path(tempfile.gettempdir()) / "jetfleet-kernels" / "j-evolve-best.py"
    assert best.read_text() == "x = 1\n" and str(best) in shown.replace("\n", "")
    assert "jetfleet status j-evolve --json" in shown


def test_demo_ends_with_a_sentence_and_leaves_no_folders(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = _cli("demo", "--quick", timeout=300, env=_env(TMPDIR=str(tmp)))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    tail = out.stdout.strip().splitlines()
    assert any("ran every job to success" in ln for ln in tail[-3:]), tail[-3:]
    assert "jetfleet up" in tail[-1]
    assert list(tmp.iterdir()) == [], list(tmp.iterdir())
