"""`jetfleet up` as a real child process for the security and TLS tests: started
with its output in a file, read for what it prints, stopped with SIGINT."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.conftest import ROOT

SEED = re.compile(r"S[UAO][A-Z2-7]{54}")  # an nkey seed (user, account, operator)


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("JETFLEET_")}
    return {**base, "PYTHONPATH": str(ROOT), "JETFLEET_LOG": "INFO", **extra}


def cli(*args: str, timeout: float = 60, environ: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], env=environ or env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    data: Path
    out: Path
    url: str = ""
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.proc.pid).children(recursive=True)
        return []

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.text()


@contextlib.contextmanager
def up(data: Path, *args: str, timeout: float = 90) -> Iterator[Up]:
    out = data.parent / f"{data.name}.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "up", "--data-dir", str(data),
                                 *args], env=env(), stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)
    fleet = Up(proc, data, out)
    try:
        deadline = time.monotonic() + timeout
        while "export JETFLEET_NATS_URL=" not in fleet.text():
            assert proc.poll() is None, fleet.text()
            assert time.monotonic() < deadline, fleet.text()
            time.sleep(0.1)
        fleet.lines = fleet.text().splitlines()
        fleet.url = next(ln.split("=", 1)[1].strip() for ln in fleet.lines
                         if "export JETFLEET_NATS_URL=" in ln)
        yield fleet
    finally:
        fleet.stop()
        for p in fleet.descendants():  # nothing is left behind, whatever happened
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
