"""Seed 004's `embed` capability: text in, an embedding out, by reference.

A hashing-trick bag-of-words embedding (numpy): tokens are hashed into 256
buckets with a sign, counted sublinearly and L2-normalised. The text comes
inline or as an ObjRef (`text_ref`); the vector goes to the object store as
a .npy and travels back as an ObjRef.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Any

import msgspec
import numpy as np

from agents.worker import App, JobContext, JobError
from bus import codec
from schemas.common import ObjRef

app = App("embed")
DIM = 256
_TOKEN = re.compile(r"[a-z0-9']+")


def embed_text(text: str, dim: int = DIM) -> np.ndarray:
    vec = np.zeros(dim, dtype=np.float32)
    for token in _TOKEN.findall(text.lower()):
        h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
        vec[h % dim] += 1.0 if (h >> 63) & 1 else -1.0
    vec = np.sign(vec) * np.log1p(np.abs(vec))
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm else vec


def to_npy(vec: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, vec, allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes | bytearray) -> np.ndarray:
    return np.load(io.BytesIO(bytes(data)), allow_pickle=False)


class EmbedRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: str | None = None
    text_ref: ObjRef | None = None


@app.capability(type="embed")
async def embed(ctx: JobContext, p: EmbedRequest) -> dict[str, Any]:
    if p.text_ref is not None:
        text = (await ctx.objects.get(p.text_ref)).decode("utf-8", "replace")
    elif p.text is not None:
        text = p.text
    else:
        raise JobError("invalid_payload", "give text or text_ref", retryable=False)
    vec = embed_text(text)
    ref = await ctx.objects.put(to_npy(vec), name=f"embeddings/{ctx.job_id}.npy", ttl=3600)
    return {"embedding": codec.to_builtins(ref), "dim": DIM,
            "tokens": len(_TOKEN.findall(text.lower())), "worker": ctx.worker_id}
