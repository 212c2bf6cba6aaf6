"""SiLU (swish) activation: x * sigmoid(x)."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x)


def get_inputs() -> list[torch.Tensor]:
    return [torch.randn(64, 256) * 3.0]


def get_init_inputs() -> list[object]:
    return []
