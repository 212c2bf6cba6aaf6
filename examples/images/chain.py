"""thumbnail -> describe -> report: three capabilities in a chain of calls,
passing images and reports by reference (ObjRef) through the object store.

    image.thumbnail   decodes the image (any format Pillow reads), makes a
                      thumbnail, stores it, calls image.describe with its ref
    image.describe    reads the thumbnail by ref, measures it with numpy
                      (colour, brightness, contrast, edges, dominant colours),
                      calls image.report with the ref and the figures
    image.report      writes a Markdown report to the object store, returns its ref

Real work on real inputs with Pillow and numpy from the package index;
nothing is downloaded at run time. Run it: see examples/README.md.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import msgspec
import numpy as np
from PIL import Image, ImageFilter

from agents.worker import App, JobContext, JobError
from bus import codec
from schemas.common import ObjRef

app = App("images")


class ThumbnailRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    image: ObjRef
    max_side: int = 128


class DescribeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    image: ObjRef  # the thumbnail
    source: dict[str, Any] = {}


class ReportRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    image: ObjRef
    source: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    description: str = ""


def _open(data: bytes | bytearray) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # not an image Pillow can read: the job fails, not retried
        raise JobError("not_an_image", f"cannot decode the image: {exc}",
                       retryable=False) from None
    return img


def make_thumbnail(data: bytes | bytearray, max_side: int) -> tuple[bytes, dict[str, Any]]:
    img = _open(data)
    source = {"width": img.width, "height": img.height, "format": img.format,
              "mode": img.mode}
    thumb = img.convert("RGB")
    thumb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    thumb.save(out, format="PNG", optimize=True)
    return out.getvalue(), source


def measure(data: bytes | bytearray) -> dict[str, Any]:
    img = _open(data).convert("RGB")
    rgb = np.asarray(img, dtype=np.float32) / 255.0
    luma = rgb @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
    edges = np.asarray(img.convert("L").filter(ImageFilter.FIND_EDGES), dtype=np.float32)
    quant = img.quantize(colors=4, method=Image.Quantize.MEDIANCUT)
    palette = quant.getpalette() or []
    counts = np.bincount(np.asarray(quant).ravel(), minlength=4)
    order = np.argsort(-counts)
    dominant = [{"rgb": "#{:02x}{:02x}{:02x}".format(*palette[3 * i:3 * i + 3]),
                 "share": round(float(counts[i] / counts.sum()), 3)}
                for i in order if counts[i]]
    return {"width": img.width, "height": img.height,
            "mean_rgb": [round(float(v), 3) for v in rgb.mean(axis=(0, 1))],
            "brightness": round(float(luma.mean()), 3),
            "contrast": round(float(luma.std()), 3),
            "edge_density": round(float((edges > 32).mean()), 3),
            "dominant": dominant}


def words(stats: dict[str, Any]) -> str:
    b, c, e = stats["brightness"], stats["contrast"], stats["edge_density"]
    light = "bright" if b > 0.6 else "dark" if b < 0.35 else "mid-toned"
    contrast = "high-contrast" if c > 0.25 else "low-contrast" if c < 0.1 else "moderately contrasted"
    detail = "busy with detail" if e > 0.25 else "smooth" if e < 0.08 else "moderately detailed"
    lead = stats["dominant"][0]["rgb"] if stats["dominant"] else "?"
    return f"a {light}, {contrast} picture, {detail}; mostly {lead}"


@app.capability(type="image.thumbnail")
async def thumbnail(ctx: JobContext, p: ThumbnailRequest) -> dict[str, Any]:
    if not 8 <= p.max_side <= 4096:
        raise JobError("invalid_payload", "max_side must be 8 to 4096", retryable=False)
    data = await ctx.objects.get(p.image)
    png, source = await asyncio.to_thread(make_thumbnail, data, p.max_side)
    ref = await ctx.objects.put(png, name=f"thumbnails/{ctx.job_id}.png", ttl=24 * 3600)
    described = await ctx.call("image.describe", {"image": codec.to_builtins(ref),
                                                  "source": source})
    return {"thumbnail": codec.to_builtins(ref), "source": source, **described}


@app.capability(type="image.describe")
async def describe(ctx: JobContext, p: DescribeRequest) -> dict[str, Any]:
    stats = await asyncio.to_thread(measure, await ctx.objects.get(p.image))
    text = words(stats)
    reported = await ctx.call("image.report", {"image": codec.to_builtins(p.image),
                                               "source": p.source, "stats": stats,
                                               "description": text})
    return {"description": text, "stats": stats, **reported}


@app.capability(type="image.report")
async def report(ctx: JobContext, p: ReportRequest) -> dict[str, Any]:
    s, src = p.stats, p.source
    lines = [
        "# Image report", "",
        f"- source: {src.get('width')}x{src.get('height')} {src.get('format')} ({src.get('mode')})",
        f"- thumbnail: {s.get('width')}x{s.get('height')} PNG, object `{p.image.name}` "
        f"({p.image.size} bytes, {p.image.digest})",
        f"- in words: {p.description}",
        f"- brightness {s.get('brightness')}, contrast {s.get('contrast')}, "
        f"edge density {s.get('edge_density')}, mean RGB {s.get('mean_rgb')}",
        "- dominant colours: " + ", ".join(f"{d['rgb']} ({d['share']:.0%})"
                                          for d in s.get("dominant", [])),
        "", f"Made by jobs on the fleet: report {ctx.job_id} on {ctx.worker_id}.", ""]
    text = "\n".join(lines).encode()
    ref = await ctx.objects.put(text, name=f"reports/{ctx.job_id}.md", ttl=24 * 3600)
    return {"report": codec.to_builtins(ref)}
