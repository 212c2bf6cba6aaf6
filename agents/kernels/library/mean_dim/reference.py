"""Mean reduction over the last dimension of a 2-D tensor."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mean(x, dim=self.dim)


def get_inputs() -> list[torch.Tensor]:
    return [torch.randn(32, 200)]


def get_init_inputs() -> list[object]:
    return [1]
