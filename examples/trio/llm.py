"""Seed 003's real-time GPU worker, in miniature: `llm.generate`.

A character-level bigram language model, trained once at start (`@app.on_start`)
on a corpus Python ships (the Zen of Python, `import this`), sampled with
numpy. Each job leases 8 GB of a GPU (`gpu_memory_mb=8192`): two slots of a
16 GB GPU split in four. The model computes on the CPU; the result names the
leased device and says whether it is simulated.
"""

from __future__ import annotations

import codecs
import itertools
import os
from typing import Any

import msgspec
import numpy as np

from agents.worker import App, JobContext

app = App("llm")
MODEL: dict[str, Any] = {}


def corpus() -> str:
    import this

    return codecs.decode(this.s, "rot13")


@app.on_start
def train() -> None:
    text = corpus()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    counts = np.full((len(chars), len(chars)), 0.01)  # a little smoothing
    for a, b in itertools.pairwise(text):
        counts[index[a], index[b]] += 1
    MODEL.update(chars=chars, index=index, probs=counts / counts.sum(axis=1, keepdims=True),
                 corpus_chars=len(text))


class Prompt(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    prompt: str = "Beautiful is"
    max_chars: int = 80
    seed: int = 0
    temperature: float = 0.8


def generate(p: Prompt) -> str:
    rng = np.random.default_rng(p.seed)
    chars, index, probs = MODEL["chars"], MODEL["index"], MODEL["probs"]
    out = list(p.prompt)
    current = index.get(out[-1], 0) if out else 0
    for _ in range(max(0, min(p.max_chars, 2000))):
        logits = np.log(probs[current]) / max(p.temperature, 0.05)
        weights = np.exp(logits - logits.max())
        current = int(rng.choice(len(chars), p=weights / weights.sum()))
        out.append(chars[current])
    return "".join(out)


@app.capability(type="llm.generate", gpu_memory_mb=8192)
async def llm_generate(ctx: JobContext, p: Prompt) -> dict[str, Any]:
    return {"text": generate(p), "model": f"bigram over {MODEL['corpus_chars']} chars",
            "devices": ctx.devices, "computed_on": "cpu",
            "gpu": "simulated" if os.environ.get("JETFLEET_SIMULATED_GPUS") else "real"}
