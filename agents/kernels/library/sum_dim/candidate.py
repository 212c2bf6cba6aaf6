"""Triton candidate: row sums, one program per row, looping over column blocks."""

import torch
import torch.nn as nn
import triton
import triton.language as tl

BLOCK_SIZE = 128  # tune: 16, 32, 64, 128, 256, 512, 1024
NUM_WARPS = 4  # tune: 1, 2, 4, 8


@triton.jit
def _row_sum_kernel(x_ptr, out_ptr, n_cols, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * stride_row + cols, mask=cols < n_cols, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


class ModelNew(nn.Module):
    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The library problem reduces the last dim of a 2-D input.
        x = x.contiguous()
        n_rows, n_cols = x.shape
        out = torch.empty((n_rows,), dtype=x.dtype, device=x.device)
        _row_sum_kernel[(n_rows,)](x, out, n_cols, x.stride(0), BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
        return out
