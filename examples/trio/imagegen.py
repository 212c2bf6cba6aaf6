"""Seed 003's queued GPU worker: `image.generate`, one image at a time.

Renders a Julia set (numpy, escape-time iteration) of the size asked and
stores it as PNG (Pillow) in the object store. Each job leases 4 GB of a GPU
(one slot of four) and the capability runs one job at a time
(`concurrency=1`): the others queue on the bus until it is free.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from typing import Any

import msgspec
import numpy as np
from PIL import Image

from agents.worker import App, JobContext
from bus import codec

app = App("imagegen")


class Render(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    width: int = 256
    height: int = 256
    c_real: float = -0.8
    c_imag: float = 0.156
    iterations: int = 120


def julia(p: Render) -> bytes:
    w, h = max(8, min(p.width, 2048)), max(8, min(p.height, 2048))
    y, x = np.mgrid[-1.2:1.2:h * 1j, -1.6:1.6:w * 1j]
    z = x + 1j * y
    escaped = np.zeros(z.shape, dtype=np.int32)
    alive = np.ones(z.shape, dtype=bool)
    c = complex(p.c_real, p.c_imag)
    for i in range(max(1, min(p.iterations, 1000))):
        z[alive] = z[alive] ** 2 + c
        out = alive & (np.abs(z) > 2)
        escaped[out] = i
        alive &= ~out
    level = (escaped / max(1, escaped.max()) * 255).astype(np.uint8)
    rgb = np.stack([level, (level * 0.6).astype(np.uint8), 255 - level], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


@app.capability(type="image.generate", gpu_memory_mb=4096, concurrency=1)
async def generate(ctx: JobContext, p: Render) -> dict[str, Any]:
    t0 = time.time()
    png = await asyncio.to_thread(julia, p)
    ref = await ctx.objects.put(png, name=f"generated/{ctx.job_id}.png", ttl=24 * 3600)
    return {"image": codec.to_builtins(ref), "width": p.width, "height": p.height,
            "started": t0, "ended": time.time(), "devices": ctx.devices, "computed_on": "cpu",
            "gpu": "simulated" if os.environ.get("JETFLEET_SIMULATED_GPUS") else "real"}
