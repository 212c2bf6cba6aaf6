"""The channel between the trusted evaluator and the candidate's process.

One stream socket that the trusted side creates and owns; the candidate's end
is inherited as a file descriptor. Each frame is

    <u32 header length> <u32 payload length> <header: msgspec JSON> <payload: raw bytes>

and the payload is the concatenated bytes of the tensors the header lists
(`TensorSpec`, in order). Tensors cross as plain bytes of a declared dtype and
shape, so what the trusted side compares is always a dense `torch.Tensor` it
built itself: a candidate's tensor subclass, lazy tensor or patched method
never reaches the comparison.

The reader states the largest payload it will accept before anything is read,
so a candidate cannot make the trusted side allocate what it likes.

Used by both sides; torch is imported only inside the tensor helpers, so the
worker can import this module without torch.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

FRAME_HEAD = struct.Struct("<II")
MAX_HEADER = 16 * 1024 * 1024
CHUNK = 1 << 20

# dtype name -> bytes per element. Anything else is refused on both sides.
ITEMSIZE: dict[str, int] = {
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "bool": 1,
    "complex64": 8, "complex128": 16,
}


class ProtocolError(Exception):
    """The peer sent something the protocol does not allow."""


class ChannelClosed(EOFError):
    """The peer closed the channel at a frame boundary."""


# ---- messages ------------------------------------------------------------------------------


class TensorSpec(msgspec.Struct, array_like=True, frozen=True):
    dtype: str
    shape: list[int]
    nbytes: int


class ParamSpec(msgspec.Struct, array_like=True, frozen=True):
    name: str
    dtype: str
    shape: list[int]


# trusted -> candidate
class Setup(msgspec.Struct, tag="setup", kw_only=True):
    candidate_source: str
    device: Literal["cpu", "cuda"]
    # Seeds ModelNew's constructor (public: weights are not a secret, inputs are).
    construct_seed: int
    init_tree: Any
    tensors: list[TensorSpec]
    l2_flush_mb: int = 0


class Weights(msgspec.Struct, tag="weights", kw_only=True):
    names: list[str]
    tensors: list[TensorSpec]


class Run(msgspec.Struct, tag="run", kw_only=True):
    run_id: int
    args_tree: Any
    tensors: list[TensorSpec]
    timed: bool = False
    # Turn the candidate-side op log on (best effort; see guards.py).
    observe: bool = True


class Finish(msgspec.Struct, tag="finish"):
    pass


# candidate -> trusted
class Ready(msgspec.Struct, tag="ready", kw_only=True):
    """torch and triton import and the device works: before any candidate code runs."""

    device: str


class Built(msgspec.Struct, tag="built", kw_only=True):
    params: list[ParamSpec]


class Output(msgspec.Struct, tag="output", kw_only=True):
    run_id: int
    # Flattened outputs: {"$t": i} a tensor of `tensors`, {"$bad": "Type"} a
    # value that was not exactly a torch.Tensor, else a JSON scalar.
    leaves: list[Any]
    tensors: list[TensorSpec]
    # Milliseconds the candidate's process measured (device events or
    # perf_counter) for a timed run; checked against the trusted clock.
    ms: float | None = None
    # Whether the candidate modified its input tensors (candidate-side, best effort).
    mutated_inputs: bool = False


class Failed(msgspec.Struct, tag="failed", kw_only=True):
    status: Literal["compile_error", "runtime_error"]
    error: str
    traceback: str = ""
    out_of_memory: bool = False


class Report(msgspec.Struct, tag="report", kw_only=True):
    flags: list[str]
    messages: list[str]
    launches: int = 0


ToCandidate = Setup | Weights | Run | Finish
ToTrusted = Ready | Built | Output | Failed | Report

_to_candidate = msgspec.json.Decoder(ToCandidate)
_to_trusted = msgspec.json.Decoder(ToTrusted)
_encoder = msgspec.json.Encoder()


# ---- frames --------------------------------------------------------------------------------


def send_frame(sock: socket.socket, msg: msgspec.Struct, payload: Sequence[memoryview | bytes] = ()) -> None:
    header = _encoder.encode(msg)
    size = sum(len(memoryview(p).cast("B")) for p in payload)
    sock.sendall(FRAME_HEAD.pack(len(header), size) + header)
    for part in payload:
        sock.sendall(part)


def _recv_exact(sock: socket.socket, n: int, *, at_boundary: bool = False) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, CHUNK))
        if k == 0:
            if at_boundary and got == 0:
                raise ChannelClosed("channel closed")
            raise ProtocolError(f"channel closed inside a frame ({got}/{n} bytes)")
        got += k
    return buf


def recv_frame(sock: socket.socket, *, max_payload: int) -> tuple[bytes, bytearray]:
    """One frame's (header, payload); refuses a payload larger than `max_payload`."""
    head = _recv_exact(sock, FRAME_HEAD.size, at_boundary=True)
    hlen, plen = FRAME_HEAD.unpack(head)
    if hlen > MAX_HEADER:
        raise ProtocolError(f"header of {hlen} bytes exceeds {MAX_HEADER}")
    if plen > max_payload:
        raise ProtocolError(f"payload of {plen} bytes exceeds the {max_payload} expected")
    header = bytes(_recv_exact(sock, hlen))
    payload = _recv_exact(sock, plen) if plen else bytearray()
    return header, payload


def recv_to_trusted(sock: socket.socket, *, max_payload: int) -> tuple[ToTrusted, bytearray]:
    header, payload = recv_frame(sock, max_payload=max_payload)
    try:
        msg = _to_trusted.decode(header)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise ProtocolError(f"malformed message: {exc}") from exc
    check_payload(_specs_of(msg), payload)
    return msg, payload


def recv_to_candidate(sock: socket.socket) -> tuple[ToCandidate, bytearray]:
    header, payload = recv_frame(sock, max_payload=1 << 40)
    msg = _to_candidate.decode(header)
    check_payload(_specs_of(msg), payload)
    return msg, payload


def _specs_of(msg: msgspec.Struct) -> list[TensorSpec]:
    specs = getattr(msg, "tensors", [])
    return list(specs)


def spec_nbytes(spec: TensorSpec) -> int:
    """Bytes a spec must have; ProtocolError for an unknown dtype or a bad shape."""
    if spec.dtype not in ITEMSIZE:
        raise ProtocolError(f"dtype {spec.dtype!r} is not allowed")
    if len(spec.shape) > 16 or any(not isinstance(d, int) or d < 0 for d in spec.shape):
        raise ProtocolError(f"bad shape {spec.shape!r}")
    return math.prod(spec.shape) * ITEMSIZE[spec.dtype]


def check_payload(specs: Sequence[TensorSpec], payload: bytearray) -> None:
    total = 0
    for spec in specs:
        need = spec_nbytes(spec)
        if spec.nbytes != need:
            raise ProtocolError(f"tensor {spec.dtype}{spec.shape} declares {spec.nbytes} bytes, not {need}")
        total += need
    if total != len(payload):
        raise ProtocolError(f"payload has {len(payload)} bytes, the header declares {total}")


# ---- tensors and trees (torch imported lazily) ---------------------------------------------


def _torch() -> Any:
    import torch

    return torch


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_to_wire(t: Any) -> tuple[TensorSpec, memoryview]:
    """A plain tensor's spec and bytes (copied to the CPU, dense)."""
    torch = _torch()
    name = dtype_name(t.dtype)
    if name not in ITEMSIZE:
        raise TypeError(f"tensors of dtype {t.dtype} cannot be sent")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
    return TensorSpec(name, [int(d) for d in t.shape], len(data)), data


def tensors_from_wire(specs: Sequence[TensorSpec], payload: bytearray) -> list[Any]:
    """Fresh dense tensors built from bytes; the payload was checked against the specs."""
    torch = _torch()
    out: list[Any] = []
    view = memoryview(payload)
    offset = 0
    for spec in specs:
        dtype = getattr(torch, spec.dtype)
        if spec.nbytes == 0:
            out.append(torch.empty(spec.shape, dtype=dtype))
            continue
        chunk = view[offset:offset + spec.nbytes]
        offset += spec.nbytes
        raw = torch.frombuffer(bytearray(chunk), dtype=torch.uint8)
        out.append(raw.view(dtype).reshape(spec.shape))
    return out


def pack_tree(obj: Any, tensors: list[Any]) -> Any:
    """A JSON-able tree for `obj`; tensors are appended to `tensors` and referenced by index."""
    torch = _torch()
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"$t": len(tensors) - 1}
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$f": repr(obj)}
    if isinstance(obj, torch.dtype):
        return {"$dtype": dtype_name(obj)}
    if isinstance(obj, tuple):
        return {"$tuple": [pack_tree(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [pack_tree(x, tensors) for x in obj]
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"$dict": {k: pack_tree(v, tensors) for k, v in obj.items()}}
    raise TypeError(f"a value of type {type(obj).__name__} cannot be sent to the candidate")


def unpack_tree(tree: Any, tensors: Sequence[Any]) -> Any:
    torch = _torch()
    if isinstance(tree, list):
        return [unpack_tree(x, tensors) for x in tree]
    if isinstance(tree, dict):
        if "$t" in tree:
            return tensors[int(tree["$t"])]
        if "$f" in tree:
            return float(tree["$f"])
        if "$dtype" in tree:
            name = str(tree["$dtype"])
            if name not in ITEMSIZE:
                raise ProtocolError(f"dtype {name!r} is not allowed")
            return getattr(torch, name)
        if "$tuple" in tree:
            return tuple(unpack_tree(x, tensors) for x in tree["$tuple"])
        if "$dict" in tree:
            return {str(k): unpack_tree(v, tensors) for k, v in tree["$dict"].items()}
        raise ProtocolError(f"unknown tree node {sorted(tree)!r}")
    return tree


def wire_tensors(tensors: Sequence[Any]) -> tuple[list[TensorSpec], list[memoryview]]:
    specs: list[TensorSpec] = []
    data: list[memoryview] = []
    for t in tensors:
        spec, raw = tensor_to_wire(t)
        specs.append(spec)
        data.append(raw)
    return specs, data
