"""Triton candidate: row softmax with an online max/sum pass and a normalising pass.

Looping over column blocks keeps it correct for any BLOCK_SIZE, so the
generator may rewrite the block size freely.
"""

import torch
import torch.nn as nn
import triton
import triton.language as tl

BLOCK_SIZE = 128  # tune: 16, 32, 64, 128, 256, 512, 1024
NUM_WARPS = 4  # tune: 1, 2, 4, 8


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, n_cols, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row * stride_row
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf"))
        m_new = tl.maximum(m, x)
        # Lanes that have only seen -inf keep a zero sum (avoid inf - inf).
        scale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        s = s * scale + tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
        m = m_new
    row_max = tl.max(m, axis=0)
    row_sum = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - row_max)), axis=0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=float("-inf"))
        tl.store(out_ptr + row * stride_row + cols, tl.exp(x - row_max) / row_sum, mask=mask)


class ModelNew(nn.Module):
    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.contiguous().view(-1, x.shape[-1])
        out = torch.empty_like(x2)
        n_rows, n_cols = x2.shape
        _softmax_kernel[(n_rows,)](x2, out, n_cols, x2.stride(0), BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
        return out.view(x.shape)
