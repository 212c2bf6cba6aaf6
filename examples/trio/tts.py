"""Seed 003's CPU-only worker: `tts.speak` turns text into audio, no GPU.

Not a neural voice: each letter becomes a short vowel-like sound (two
formants over a pitch with an attack/decay envelope), synthesised with
numpy and written as a 16-bit WAV into the object store. The result is the
WAV's ObjRef, its length and a spectral check of what was made.
"""

from __future__ import annotations

import asyncio
import io
import wave
from typing import Any

import msgspec
import numpy as np

from agents.worker import App, JobContext, JobError
from bus import codec

app = App("tts")
RATE = 16_000
# Two formants (Hz) per vowel; consonants get a noisy burst.
FORMANTS = {"a": (730, 1090), "e": (530, 1840), "i": (270, 2290), "o": (570, 840),
            "u": (300, 870)}


class Speech(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: str
    pitch_hz: float = 140.0
    seconds_per_letter: float = 0.09


def synthesise(p: Speech) -> np.ndarray:
    n = int(RATE * p.seconds_per_letter)
    t = np.arange(n) / RATE
    envelope = np.minimum(1.0, t / 0.01) * np.exp(-t / (p.seconds_per_letter / 2))
    rng = np.random.default_rng(len(p.text))
    pieces = []
    for ch in p.text.lower():
        if ch in FORMANTS:
            f1, f2 = FORMANTS[ch]
            carrier = np.sign(np.sin(2 * np.pi * p.pitch_hz * t)) * 0.3
            sound = carrier * (np.sin(2 * np.pi * f1 * t) + 0.5 * np.sin(2 * np.pi * f2 * t))
        elif ch.isalpha():
            sound = rng.normal(0, 0.2, n) * np.exp(-t / 0.015)
        else:
            sound = np.zeros(n)
        pieces.append(sound * envelope)
    audio = np.concatenate(pieces) if pieces else np.zeros(1)
    peak = float(np.abs(audio).max()) or 1.0
    return (audio / peak * 0.8).astype(np.float32)


def wav_bytes(audio: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((audio * 32767).astype("<i2").tobytes())
    return out.getvalue()


def centroid_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    freqs = np.fft.rfftfreq(len(audio), 1 / RATE)
    return float((spectrum * freqs).sum() / max(spectrum.sum(), 1e-9))


@app.capability(type="tts.speak")
async def speak(ctx: JobContext, p: Speech) -> dict[str, Any]:
    if not p.text.strip() or len(p.text) > 5000:
        raise JobError("invalid_payload", "text must be 1 to 5000 characters", retryable=False)
    audio = await asyncio.to_thread(synthesise, p)
    data = await asyncio.to_thread(wav_bytes, audio)
    ref = await ctx.objects.put(data, name=f"speech/{ctx.job_id}.wav", ttl=24 * 3600)
    return {"audio": codec.to_builtins(ref), "seconds": round(len(audio) / RATE, 3),
            "sample_rate": RATE, "centroid_hz": round(centroid_hz(audio), 1),
            "devices": ctx.devices, "computed_on": "cpu"}
