"""`jetfleet config init` and `--config`: every setting and option in one file,
with a flag, then the environment, then the file, then the default winning."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

from bus.settings import Settings
from tests.conftest import ROOT


def _cli(*args: str, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args],
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                          capture_output=True, text=True, timeout=60, cwd=cwd or ROOT)


def test_init_writes_every_setting_and_option_with_its_default(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    out = _cli("config", "init", str(path))
    assert out.returncode == 0, out.stderr
    data = tomllib.loads(path.read_text())
    assert set(data["settings"]) == {f.name for f in fields(Settings)}
    assert data["settings"]["lease_ttl_s"] == Settings().lease_ttl_s
    assert {"up", "dispatcher", "worker", "evolver", "agent", "monitor", "query"} <= set(data)
    assert data["worker"]["gpu_slots"] == 1 and data["dispatcher"]["unschedulable_after"] == 30.0
    # Every value has its line of help above it.
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), line
    again = _cli("config", "init", str(path))
    assert again.returncode == 2 and "--force" in again.stderr


def test_a_flag_beats_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text("[settings]\nconnect_timeout_s = 1.0\n"
                    "nats_url = 'nats://127.0.0.1:1'\n")
    # The file's URL and timeout apply: a quick, clear failure naming its URL.
    out = _cli("--config", str(path), "jobs", env={"JETFLEET_NATS_URL": ""})
    assert out.returncode == 2 and "nats://127.0.0.1:1 within 1s" in out.stderr
    # The environment beats the file ...
    out = _cli("--config", str(path), "jobs", env={"JETFLEET_NATS_URL": "nats://127.0.0.1:2"})
    assert "nats://127.0.0.1:2" in out.stderr
    # ... and a flag beats both.
    out = _cli("jobs", "--config", str(path), "--nats", "nats://127.0.0.1:3",
               env={"JETFLEET_NATS_URL": "nats://127.0.0.1:2"})
    assert "nats://127.0.0.1:3" in out.stderr
    # A component's options come from its section; its own flag still wins.
    path.write_text("[worker]\ncapacity = 0\n")
    out = _cli("--config", str(path), "run", "worker", "--sandbox", "best",
               env={"JETFLEET_NATS_URL": "nats://127.0.0.1:1", "JETFLEET_CONNECT_TIMEOUT_S": "1"})
    assert out.returncode == 2 and "nats://127.0.0.1:1" in out.stderr


def test_a_bad_value_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    cases = [("[settings]\nlease_ttl_s = 'soon'\n", "JETFLEET_LEASE_TTL_S='soon': expected float"),
             ("[settings]\nleas_ttl_s = 3\n", "unknown setting [settings] leas_ttl_s"),
             ("[worker]\ncapacity = 'many'\n", "[worker] capacity = 'many': expected a whole"),
             ("[worker]\nsandbox = 'lax'\n", "expected one of best, strict"),
             ("[nope]\nx = 1\n", "unknown section [nope]"),
             ("[settings\n", "not valid TOML")]
    for text, fragment in cases:
        path = tmp_path / "bad.toml"
        path.write_text(text)
        out = _cli("--config", str(path), "jobs")
        assert out.returncode == 2, (text, out.stderr)
        assert "Traceback" not in out.stderr
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and fragment in lines[0], (text, out.stderr)
    missing = _cli("--config", str(tmp_path / "none.toml"), "jobs")
    assert missing.returncode == 2 and "config init" in missing.stderr


def test_a_strict_sandbox_without_full_isolation_refuses_to_start() -> None:
    out = _cli("run", "worker", "--sandbox", "strict", "--nats", "nats://127.0.0.1:1",
               env={"JETFLEET_SANDBOX_DISABLE_NAMESPACES": "1"})
    assert out.returncode == 2
    assert "--sandbox strict: this host cannot fully isolate kernel candidates" in out.stderr
    assert "Traceback" not in out.stderr
