"""Triton candidate: RMSNorm, one row per program, sum of squares then scale."""

import torch
import torch.nn as nn
import triton
import triton.language as tl

BLOCK_SIZE = 128  # tune: 16, 32, 64, 128, 256, 512, 1024
NUM_WARPS = 4  # tune: 1, 2, 4, 8


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, n_cols, stride_row, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row * stride_row
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=0.0)
        acc += x * x
    inv_rms = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_row + cols, x * inv_rms * w, mask=mask)


class ModelNew(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.randn(dim) * 0.5 + 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.contiguous().view(-1, x.shape[-1])
        out = torch.empty_like(x2)
        n_rows, n_cols = x2.shape
        _rmsnorm_kernel[(n_rows,)](
            x2, self.weight, out, n_cols, x2.stride(0), self.eps,
            BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS,
        )
        return out.view(x.shape)
