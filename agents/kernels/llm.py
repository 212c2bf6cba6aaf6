"""An OpenAI-compatible chat-completions client that writes Triton candidates.

Configured by the environment:

    JETFLEET_LLM_BASE_URL   e.g. http://localhost:8000/v1 (".../chat/completions" is appended)
    JETFLEET_LLM_MODEL      model name sent in the request
    JETFLEET_LLM_API_KEY    optional bearer token

Two prompts, as AIKG does: a designer that reads the problem and the feedback
on earlier candidates and writes a short plan, then a coder that turns the plan
into a complete `ModelNew` module. When nothing is configured every entry point
raises LLMNotConfigured: nothing here ever pretends to be a model.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_BASE_URL = "JETFLEET_LLM_BASE_URL"
ENV_MODEL = "JETFLEET_LLM_MODEL"
ENV_API_KEY = "JETFLEET_LLM_API_KEY"
_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_SOURCE_CHARS = 6000


class LLMError(RuntimeError):
    """The endpoint failed or answered without usable code."""


class LLMNotConfigured(LLMError):
    """No endpoint/model configured."""


@dataclass(frozen=True)
class LLMConfig:
    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 180.0
    temperature: float = 0.7
    max_tokens: int = 4096

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LLMConfig | None:
        src = os.environ if env is None else env
        base, model = src.get(ENV_BASE_URL, "").strip(), src.get(ENV_MODEL, "").strip()
        if not base or not model:
            return None
        return cls(base_url=base.rstrip("/"), model=model, api_key=src.get(ENV_API_KEY) or None)


def llm_configured(env: Mapping[str, str] | None = None) -> bool:
    return LLMConfig.from_env(env) is not None


@dataclass
class Feedback:
    """What happened to an earlier candidate, for the next prompt."""

    outcome: str
    source: str | None = None
    error: str | None = None
    flags: list[str] = field(default_factory=list)
    speedup: float | None = None
    max_abs_error: float | None = None


DESIGNER_SYSTEM = (
    "You are a GPU kernel designer. Given a PyTorch reference module, plan a Triton "
    "implementation that is correct first and fast second. Describe the kernel(s), the "
    "grid, the block sizes and the memory access pattern in a short numbered plan. "
    "Do not write code."
)
CODER_SYSTEM = (
    "You are a Triton kernel engineer. Write one complete Python module that defines "
    "`class ModelNew(nn.Module)` with the same constructor and forward signatures as the "
    "reference `Model`, computing the same result with @triton.jit kernels launched from "
    "forward. Rules: no torch compute ops in forward (only allocation such as "
    "torch.empty_like and views); do not import or call the reference Model; no "
    "try/except, threads, streams, timers, caches, os/sys/subprocess; allocate outputs "
    "on the input's device (the code must also run under TRITON_INTERPRET=1 on CPU "
    "tensors, so never assert x.is_cuda); put launch parameters in module-level "
    "UPPERCASE int constants such as BLOCK_SIZE = 256 and NUM_WARPS = 4. Answer with a "
    "single ```python code block."
)


def _clip(text: str, limit: int = _SOURCE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "\n# ... (truncated)"


def format_feedback(feedback: Sequence[Feedback], limit: int = 4) -> str:
    """The last `limit` results, with source for the best passing and the latest one."""
    if not feedback:
        return "No earlier candidates."
    recent = list(feedback)[-limit:]
    passing = [f for f in feedback if f.outcome == "pass" and f.speedup is not None]
    best = max(passing, key=lambda f: f.speedup or 0.0) if passing else None
    parts = []
    for i, f in enumerate(recent, 1):
        line = f"Candidate {i}: outcome={f.outcome}"
        if f.speedup is not None:
            line += f", speedup={f.speedup:.2f}x"
        if f.max_abs_error is not None:
            line += f", max_abs_error={f.max_abs_error:.3g}"
        if f.flags:
            line += f", flags={','.join(f.flags)}"
        if f.error:
            line += f"\n  error: {_clip(f.error, 800)}"
        parts.append(line)
    if best is not None and best.source:
        parts.append(f"Best passing candidate so far ({best.speedup:.2f}x):\n```python\n{_clip(best.source)}\n```")
    last = recent[-1]
    if last is not best and last.source and last.outcome != "pass":
        parts.append(f"Latest failing candidate:\n```python\n{_clip(last.source)}\n```")
    return "\n".join(parts)


def extract_code(text: str) -> str | None:
    """The module in a reply: the last fenced block defining ModelNew, else any parseable one."""
    blocks = [str(b).strip() + "\n" for b in _FENCE.findall(text)]
    for block in reversed(blocks):
        if "class ModelNew" in block:
            return block
    if "class ModelNew" in text and "```" not in text:
        return text.strip() + "\n"
    return None


def chat(config: LLMConfig, messages: list[dict[str, str]]) -> str:
    """One chat-completions request; the first choice's content."""
    body = json.dumps(
        {
            "model": config.model,
            "messages": messages,
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    request = urllib.request.Request(
        f"{config.base_url}/chat/completions", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s) as resp:
            payload: Any = json.loads(resp.read().decode())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise LLMError(f"LLM endpoint returned HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        raise LLMError(f"LLM endpoint unreachable or invalid reply: {exc}") from exc
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise LLMError(f"unexpected chat-completions reply: {str(payload)[:300]}") from exc
    if not isinstance(content, str):
        raise LLMError("chat-completions reply has no text content")
    return content


def _require(config: LLMConfig | None) -> LLMConfig:
    cfg = config or LLMConfig.from_env()
    if cfg is None:
        raise LLMNotConfigured(f"set {ENV_BASE_URL} and {ENV_MODEL} to generate kernels with an LLM")
    return cfg


def design(problem_source: str, feedback: Sequence[Feedback] = (), *, config: LLMConfig | None = None) -> str:
    cfg = _require(config)
    user = (
        f"Reference problem:\n```python\n{_clip(problem_source)}\n```\n\n"
        f"Feedback on earlier candidates:\n{format_feedback(feedback)}\n\nWrite the plan."
    )
    return chat(cfg, [{"role": "system", "content": DESIGNER_SYSTEM}, {"role": "user", "content": user}])


def write_code(
    problem_source: str, plan: str, feedback: Sequence[Feedback] = (), *, config: LLMConfig | None = None
) -> str:
    cfg = _require(config)
    user = (
        f"Reference problem:\n```python\n{_clip(problem_source)}\n```\n\n"
        f"Plan:\n{plan}\n\nFeedback on earlier candidates:\n{format_feedback(feedback)}\n\n"
        "Write the complete module."
    )
    reply = chat(cfg, [{"role": "system", "content": CODER_SYSTEM}, {"role": "user", "content": user}])
    code = extract_code(reply)
    if code is None:
        raise LLMError("the coder's reply contains no python block defining ModelNew")
    return code


def generate_candidate(
    problem_source: str, feedback: Sequence[Feedback] = (), *, config: LLMConfig | None = None
) -> str:
    """Designer then coder: a new candidate source for the problem."""
    cfg = _require(config)
    plan = design(problem_source, feedback, config=cfg)
    return write_code(problem_source, plan, feedback, config=cfg)
