"""Triton candidate: Leaky ReLU with a configurable negative slope."""

import torch
import torch.nn as nn
import triton
import triton.language as tl

BLOCK_SIZE = 512  # tune: 64, 128, 256, 512, 1024, 2048
NUM_WARPS = 4  # tune: 1, 2, 4, 8


@triton.jit
def _kernel(x_ptr, out_ptr, n_elements, slope, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.where(x >= 0.0, x, x * slope)
    tl.store(out_ptr + offs, y, mask=mask)


class ModelNew(nn.Module):
    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        n = x.numel()
        grid = (triton.cdiv(n, BLOCK_SIZE),)
        _kernel[grid](x, out, n, self.negative_slope, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
        return out
