"""Fused elementwise add followed by ReLU."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.relu(a + b)


def get_inputs() -> list[torch.Tensor]:
    return [torch.randn(64, 256), torch.randn(64, 256)]


def get_init_inputs() -> list[object]:
    return []
