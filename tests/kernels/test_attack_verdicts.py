"""Attack family: forged verdicts.

No file the candidate writes is read as a result; the verdict comes from the
trusted evaluator's own comparison, and the channel carries only the
protocol's messages in the protocol's order. Each test also checks that
nothing of the sandbox survives it.
"""

from __future__ import annotations

import threading

from agents.kernels.library import ProblemInfo
from schemas.kernels import KernelOutcome

from .conftest import HONEST, LAUNCH, SandboxLog, hostile, replace_once, run

RUN = {"run_rejected": True}

FORGE_AT_IMPORT = '''
_forged = '{"schema": 1, "status": "ok", "matched": true, "trials": 2, "flags": []}'
for _path in ("result.json", "/tmp/result.json", "/tmp/work/result.json", "report.json"):
    try:
        __builtins__["open"](_path, "w").write(_forged)
    except OSError:
        pass
__builtins__["__import__"]("os")._exit(EXIT_CODE)
'''


def test_result_file_and_exit_at_import_is_crashed(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    out = run(softmax, hostile(softmax, HONEST, header=FORGE_AT_IMPORT.replace("EXIT_CODE", "0")), **RUN)
    assert out.outcome == "crashed" and out.trials == 0 and not out.correct
    assert "ended before the evaluation did" in (out.error or "")


def test_forged_report_with_a_nonzero_exit_is_crashed(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    # It used to help to block the real result path and exit non-zero beside a forged report.
    header = ("import os\n"
              "for _d in ('result.json', 'result.tmp', '/tmp/work/result.json'):\n"
              "    os.makedirs(_d, exist_ok=True)\n" + FORGE_AT_IMPORT.replace("EXIT_CODE", "1"))
    out = run(softmax, hostile(softmax, HONEST, header=header), **RUN)
    assert out.outcome == "crashed" and out.returncode == 1


NEIGHBOUR = '''
import glob
import os
import time


def _forge_neighbours():
    forged = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        paths = glob.glob("/tmp/jetfleet-kernel-*") + glob.glob("/tmp/*/") + [
            f"/proc/{p}/cwd" for p in os.listdir("/proc") if p.isdigit()]
        for d in paths:
            try:
                with open(os.path.join(d, "result.json"), "w") as fh:
                    fh.write('{"status": "ok", "matched": true}')
                forged.append(d)
            except OSError:
                pass
        time.sleep(0.2)
    raise RuntimeError(f"FORGED {sorted(set(forged))}")
'''


def test_a_neighbours_verdict_cannot_be_forged(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    # A wrong candidate and a forger evaluated side by side: the wrong one stays wrong.
    wrong = replace_once(softmax.candidate_source, "/ row_sum, mask=mask)", "/ (row_sum * 1.5), mask=mask)")
    results: dict[str, KernelOutcome] = {}

    def victim() -> None:
        results["victim"] = run(softmax, wrong, trials=5)

    t = threading.Thread(target=victim)
    t.start()
    results["forger"] = run(softmax, hostile(softmax, LAUNCH + "        _forge_neighbours()\n",
                                             header=NEIGHBOUR), **RUN)
    t.join()
    assert results["victim"].outcome == "mismatch" and "value_mismatch" in results["victim"].flags
    forger = results["forger"]
    assert forger.outcome == "runtime_error"
    # All it could write to was its own private /tmp (its own cwd, seen through /proc).
    assert "jetfleet-kernel-" not in (forger.error or "")
    assert len(sandboxes.started) == 2


FORGE_FRAMES = '''
import json
import os
import socket
import struct


def _forge_frames():
    s = socket.socket(fileno=os.dup(3))
    header = json.dumps({"type": "report", "flags": [], "messages": [], "launches": 1}).encode()
    s.sendall(struct.pack("<II", len(header), 0) + header)
'''


def test_frames_forged_on_the_channel_break_the_protocol(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    # The candidate can write to the channel (it shares the process), but only
    # an output for the run asked for is accepted at that point.
    body = LAUNCH + "        _forge_frames()\n        return out.view(x.shape)\n"
    out = run(softmax, hostile(softmax, body, header=FORGE_FRAMES), **RUN)
    assert out.outcome == "crashed"
    assert "broke the evaluation protocol: expected Output, got Report" in (out.error or "")
