"""Scale then clamp to a range: clamp(x * scale, lo, hi)."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, scale: float = 2.0, lo: float = -1.0, hi: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.lo = lo
        self.hi = hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x * self.scale, self.lo, self.hi)


def get_inputs() -> list[torch.Tensor]:
    return [torch.randn(64, 256) * 3.0]


def get_init_inputs() -> list[object]:
    return [0.5, -2.0, 3.0]
