"""msgspec JSON on the wire: strict decode, one encoder for everything."""

from __future__ import annotations

import base64
from typing import Any, Literal, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


class DecodeError(ValueError):
    """A message that is not valid JSON of the expected shape; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode(data: bytes, type: type[T]) -> T:
    dec = _decoders.get(type)
    if dec is None:
        dec = _decoders[type] = msgspec.json.Decoder(type)
    try:
        value: T = dec.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # (msgspec's, for a string that is not UTF-8)
        raise DecodeError(f"not valid JSON: a string is not UTF-8 ({exc.reason} at byte "
                          f"{exc.start})") from None
    return value


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


def raw_text(data: bytes, limit: int = 64 * 1024) -> tuple[str, Literal["utf-8", "base64"]]:
    """Raw bytes as (text, encoding) for a dead letter: utf-8 when possible."""
    data = data[:limit]
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"
