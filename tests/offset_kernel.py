"""A Triton kernel that writes the offsets the longreach kernels compute, for index-arithmetic tests."""

import triton
import triton.language as tl

from longreach.kernels.tiles import batch_head, row_offsets


@triton.jit
def offsets(OUT, H, head_stride, row_stride, FIRST_ROW, ROWS: tl.constexpr):
    # Program (0, b * H + h): head h's offset plus the offsets of rows FIRST_ROW.. FIRST_ROW + ROWS - 1.
    bh, _b, h = batch_head(1, H)
    rows = FIRST_ROW + tl.arange(0, ROWS)
    offset = h * head_stride + row_offsets(rows, row_stride)
    tl.store(OUT + bh * ROWS + tl.arange(0, ROWS)[:, None], offset)
