"""Seed 004's `chat` capability, calling `embed` with an object by reference.

As in the seed's scene 3: the handler stores its input as an object, calls
another capability with the ObjRef (`ctx.call("embed", {"text_ref": ref})`),
reads the embedding back by its ref, and answers with the closest entry of
a small FAQ (cosine similarity). `chat` and `embed` are separate apps, each
started on demand by the node agent when its work waits.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
from embed import embed_text, from_npy

from agents.worker import App, JobContext
from bus import codec

app = App("chat")
FAQ = {
    "How do I submit a job?": "jetfleet submit TYPE --payload JSON, or jetfleet call TYPE to wait "
                              "for its result.",
    "Where are large inputs kept?": "In the object store; jobs pass ObjRefs to them.",
    "How are GPUs shared?": "Workers lease devices per job in KV leases; one holder at a time.",
    "Who starts workers?": "The node agent, on demand, from its apps file.",
}
QUESTIONS = list(FAQ)
INDEX = np.stack([embed_text(q) for q in QUESTIONS])


class ChatRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    message: str


@app.capability(type="chat", model="faq")
async def chat(ctx: JobContext, p: ChatRequest) -> dict[str, Any]:
    ref = await ctx.objects.put(p.message.encode(), name=f"chat/{ctx.job_id}.txt", ttl=3600)
    embedded = await ctx.call("embed", {"text_ref": codec.to_builtins(ref)})
    vec = from_npy(await ctx.objects.get(embedded["embedding"]))
    scores = INDEX @ vec
    best = int(np.argmax(scores))
    return {"reply": FAQ[QUESTIONS[best]], "matched": QUESTIONS[best],
            "similarity": round(float(scores[best]), 3), "message_ref": codec.to_builtins(ref),
            "embedding_ref": embedded["embedding"], "embedded_by": embedded["worker"]}
