"""Kernel payload schemas and the LLM client (against a local fake endpoint)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import msgspec
import pytest

from agents.kernels import llm
from schemas.kernels import KernelOutcome, KernelTimings, ProfilePayload, VerifyPayload


def test_payload_defaults_and_strictness() -> None:
    p = msgspec.json.decode(b'{"problem": "softmax", "candidate_source": "x"}', type=VerifyPayload)
    assert p.trials == 5 and p.dsl == "triton" and p.schema == 1 and p.atol is None
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"problem": "softmax", "trails": 3}', type=VerifyPayload)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"dsl": "cuda"}', type=ProfilePayload)


def test_outcome_roundtrip() -> None:
    t = KernelTimings(candidate_ms=1.0, reference_ms=2.0, candidate_p10_ms=0.9, candidate_p90_ms=1.1,
                      reference_p10_ms=1.9, reference_p90_ms=2.1, runs=100, warmup=10, speedup=2.0,
                      method="cuda_events", l2_flush=True, representative=True)
    o = KernelOutcome(kind="profile", outcome="pass", correct=True, timings=t, device="cuda:0")
    back = msgspec.json.decode(msgspec.json.encode(o), type=KernelOutcome)
    assert back == o
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"kind": "verify", "outcome": "great", "correct": true}', type=KernelOutcome)


def test_llm_not_configured_never_pretends(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (llm.ENV_BASE_URL, llm.ENV_MODEL, llm.ENV_API_KEY):
        monkeypatch.delenv(var, raising=False)
    assert not llm.llm_configured()
    with pytest.raises(llm.LLMNotConfigured):
        llm.generate_candidate("class Model: ...")


REPLY_CODE = "import torch\n\nclass ModelNew(torch.nn.Module):\n    pass\n"


class _Fake(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body["_path"], body["_auth"] = self.path, self.headers.get("Authorization")
        _Fake.requests.append(body)
        system = body["messages"][0]["content"]
        text = "1. one program per row" if "designer" in system else f"Here:\n```python\n{REPLY_CODE}```\n"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_endpoint() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()


def test_llm_designer_then_coder(fake_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(llm.ENV_BASE_URL, fake_endpoint + "/")
    monkeypatch.setenv(llm.ENV_MODEL, "test-model")
    monkeypatch.setenv(llm.ENV_API_KEY, "k")
    assert llm.llm_configured()
    _Fake.requests.clear()
    fb = [llm.Feedback(outcome="mismatch", source="class ModelNew: pass", error="max abs 3")]
    code = llm.generate_candidate("class Model: ...", fb)
    assert code == REPLY_CODE
    designer, coder = _Fake.requests
    assert designer["_path"] == "/v1/chat/completions" and designer["_auth"] == "Bearer k"
    assert designer["model"] == "test-model"
    assert "1. one program per row" in coder["messages"][1]["content"]
    assert "outcome=mismatch" in coder["messages"][1]["content"]


def test_extract_code_picks_model_new_block() -> None:
    text = "```python\nprint(1)\n```\ntext\n```python\nclass ModelNew:\n    pass\n```"
    assert llm.extract_code(text) == "class ModelNew:\n    pass\n"
    assert llm.extract_code("no code here") is None


def test_llm_unreachable_raises() -> None:
    cfg = llm.LLMConfig(base_url="http://127.0.0.1:9", model="m", timeout_s=2)
    with pytest.raises(llm.LLMError):
        llm.chat(cfg, [{"role": "user", "content": "hi"}])
