"""Triton candidate: GELU activation, tanh approximation."""

import torch
import torch.nn as nn
import triton
import triton.language as tl

BLOCK_SIZE = 512  # tune: 64, 128, 256, 512, 1024, 2048
NUM_WARPS = 4  # tune: 1, 2, 4, 8


@triton.jit
def _kernel(x_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask)
    # tanh(u) = 1 - 2 / (exp(2u) + 1): exact in fp32 and avoids libdevice differences
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    y = 0.5 * x * (1.0 + t)
    tl.store(out_ptr + offs, y, mask=mask)


class ModelNew(nn.Module):
    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        n = x.numel()
        grid = (triton.cdiv(n, BLOCK_SIZE),)
        _kernel[grid](x, out, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
        return out
