"""Layer normalisation over the last dimension with learned affine parameters."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, normalized_shape: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(normalized_shape, eps=eps)
        # Non-trivial affine parameters so a kernel that ignores them fails.
        with torch.no_grad():
            self.ln.weight.normal_(1.0, 0.5)
            self.ln.bias.normal_(0.0, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x)


def get_inputs() -> list[torch.Tensor]:
    return [torch.randn(32, 200) * 2.0 + 0.5]


def get_init_inputs() -> list[object]:
    return [200]
