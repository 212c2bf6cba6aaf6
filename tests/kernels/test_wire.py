"""The trusted side's channel: frames and tensors as plain bytes (no subprocess)."""

from __future__ import annotations

import socket
import struct
import threading

import msgspec
import pytest
import torch

from agents.kernels import wire


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool,
                                   torch.float64, torch.uint8])
def test_tensors_round_trip_as_plain_dense_tensors(dtype: torch.dtype) -> None:
    src = (torch.randn(3, 5, 7) * 10).to(dtype)
    strided = src.transpose(0, 2)  # not contiguous on the way in
    specs, data = wire.wire_tensors([strided, torch.tensor(3.5), torch.empty(0, 4)])
    payload = bytearray(b"".join(bytes(d) for d in data))
    wire.check_payload(specs, payload)
    back = wire.tensors_from_wire(specs, payload)
    assert type(back[0]) is torch.Tensor and back[0].is_contiguous()
    assert back[0].dtype == dtype and torch.equal(back[0], strided)
    assert back[1].shape == () and back[1].item() == 3.5
    assert back[2].shape == (0, 4)


def test_oversized_payload_is_refused_before_it_is_read() -> None:
    a, b = _pair()
    header = msgspec.json.encode(wire.Report(flags=[], messages=[]))
    # Declares 1 GB and sends none of it: the reader must not wait for or allocate it.
    a.sendall(struct.pack("<II", len(header), 1 << 30) + header)
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        wire.recv_to_trusted(b, max_payload=1024)


@pytest.mark.parametrize(
    ("spec", "nbytes", "match"),
    [
        (wire.TensorSpec("float32", [2, 2], 16), 12, "payload has 12 bytes"),
        (wire.TensorSpec("float32", [2, 2], 12), 12, "declares 12 bytes, not 16"),
        (wire.TensorSpec("object", [1], 8), 8, "not allowed"),
        (wire.TensorSpec("float32", [-1], 4), 4, "bad shape"),
    ],
)
def test_payload_must_match_its_specs(spec: wire.TensorSpec, nbytes: int, match: str) -> None:
    with pytest.raises(wire.ProtocolError, match=match):
        wire.check_payload([spec], bytearray(nbytes))


def test_frames_in_order_and_clean_eof() -> None:
    a, b = _pair()
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    specs, data = wire.wire_tensors([t])
    out = wire.Output(run_id=7, leaves=[{"$t": 0}, 1.5, None], tensors=specs, ms=0.25)

    def send() -> None:
        wire.send_frame(a, out, data)
        a.close()

    threading.Thread(target=send).start()
    msg, payload = wire.recv_to_trusted(b, max_payload=1024)
    assert isinstance(msg, wire.Output) and msg.run_id == 7 and msg.leaves[1:] == [1.5, None]
    assert torch.equal(wire.tensors_from_wire(msg.tensors, payload)[0], t)
    with pytest.raises(wire.ChannelClosed):
        wire.recv_to_trusted(b, max_payload=1024)


def test_a_frame_cut_short_is_a_protocol_error() -> None:
    a, b = _pair()
    header = msgspec.json.encode(wire.Report(flags=[], messages=[]))
    a.sendall(struct.pack("<II", len(header), 0) + header[:5])
    a.close()
    with pytest.raises(wire.ProtocolError, match="inside a frame"):
        wire.recv_to_trusted(b, max_payload=0)


def test_trees_keep_their_shape() -> None:
    tensors: list[torch.Tensor] = []
    tree = wire.pack_tree([torch.ones(2), (3, float("inf")), {"eps": 1e-5}, torch.float16, None], tensors)
    back = wire.unpack_tree(msgspec.json.decode(msgspec.json.encode(tree)), tensors)
    assert back[1] == (3, float("inf")) and back[2] == {"eps": 1e-5} and back[3] is torch.float16
    assert back[0] is tensors[0] and back[4] is None
    with pytest.raises(TypeError, match="cannot be sent"):
        wire.pack_tree([object()], [])
