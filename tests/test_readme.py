"""The README's examples, run as written against a real fleet (`jetfleet up`).

Every code block in README.md carries an annotation in the line before it:
    <!-- readme-test: run -->          a shell block: must exit 0, no traceback
    <!-- readme-test: python -->       a complete Python script: must exit 0
    <!-- readme-test: file NAME -->    written to NAME in the working folder
    <!-- readme-test: background -->   a shell block left running (a worker)
    <!-- readme-test: skip (why) -->   not run, with the reason
so an example cannot be added without saying how it is checked.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

FENCE = re.compile(r"<!-- readme-test: (?P<how>[a-z]+)(?P<arg>[^>]*)-->\s*\n```(?P<lang>\w*)\n"
                   r"(?P<body>.*?)\n```", re.S)


@dataclass
class Example:
    how: str
    arg: str
    lang: str
    body: str
    line: int


def examples() -> list[Example]:
    text = (ROOT / "README.md").read_text()
    found = [Example(m["how"], m["arg"].strip(), m["lang"], m["body"],
                     text[: m.start()].count("\n") + 1) for m in FENCE.finditer(text)]
    fences = text.count("\n```") // 2
    assert len(found) == fences, (
        f"{fences - len(found)} README code block(s) lack a readme-test annotation")
    return found


def test_every_readme_example_says_how_it_is_checked() -> None:
    for ex in examples():
        assert ex.how in {"run", "python", "file", "background", "skip"}, ex
        if ex.how in ("skip", "file"):
            assert ex.arg, f"README line {ex.line}: `{ex.how}` needs a reason or a name"


def _up(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "up", "--data-dir",
                             str(tmp / "fleet")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    line = ""
    while "nats at" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
    assert "nats at" in line, line
    return proc, line.split("nats at ")[1].split(",")[0]


def test_the_readme_examples_run_as_written(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JETFLEET_LOG": "WARNING",
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    up, url = _up(tmp_path, env)
    env["JETFLEET_NATS_URL"] = url
    background: list[subprocess.Popen[bytes]] = []
    ran = 0
    try:
        for ex in examples():
            where = f"README line {ex.line}"
            if ex.how == "skip":
                continue
            if ex.how == "file":
                (work / ex.arg).write_text(ex.body + "\n")
                continue
            if ex.how == "background":
                log = open(tmp_path / f"background-{ex.line}.log", "wb")
                proc = subprocess.Popen(["bash", "-c", ex.body], env=env, cwd=work,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                background.append(proc)
                time.sleep(3)
                assert proc.poll() is None, (where, (tmp_path / f"background-{ex.line}.log")
                                             .read_text())
                continue
            if ex.how == "python":
                script = work / f"example_{ex.line}.py"
                script.write_text(ex.body + "\n")
                argv = [sys.executable, str(script)]
            else:
                argv = ["bash", "-e", "-o", "pipefail", "-c", ex.body]
            out = subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True,
                                 timeout=600)
            ran += 1
            assert out.returncode == 0, (where, ex.body, out.stdout[-3000:], out.stderr[-3000:])
            assert "Traceback" not in out.stdout + out.stderr, (where, out.stderr[-3000:])
        assert ran >= 5
    finally:
        for proc in background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        up.send_signal(signal.SIGINT)
        try:
            up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            pytest.fail("jetfleet up did not stop within 60 s")
