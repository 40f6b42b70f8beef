"""The Triton kernels of MXFP4-resident gpt-oss experts (mxfp4_experts.py holds the module and says why).

Imported only on a GPU: triton is a GPU extra. Layout (mxfp4.py): per expert, each output row's inputs in blocks of
32 values, a block's 16 bytes holding two e2m1 codes each (low nibble = even input), one e8m0 scale byte per block.
"""

import triton
import triton.language as tl


@triton.jit
def e2m1_magnitudes(codes):
    """e2m1 codes (int32, 0..15) -> their values as float32, times 4 and unsigned: the magnitude of code
    e1 e0 m is m / 2 for e = 0 and (1 + m / 2) 2^(e - 1) otherwise, i.e. 4x that is 2m or (2 + m) << e."""
    e = (codes >> 1) & 3
    m = codes & 1
    times_four = tl.where(e == 0, 2 * m, (2 + m) << e)
    value = times_four.to(tl.float32)
    return tl.where((codes & 8) != 0, -value, value)


@triton.jit
def scale_values(scale_bytes):
    """e8m0 scale bytes -> 2^(byte - 127) / 4 as float32 (the / 4 undoes e2m1_magnitudes' x 4; byte 0 -> 0)."""
    return (scale_bytes.to(tl.int32) << 23).to(tl.float32, bitcast=True) * 0.25


@triton.jit
def dequantize_kernel(blocks_ptr, scales_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    valid = block < n_blocks
    byte = tl.arange(0, 16)
    packed = tl.load(blocks_ptr + block[:, None] * 16 + byte[None, :], mask=valid[:, None], other=0)
    packed = packed.to(tl.int32)
    scale = scale_values(tl.load(scales_ptr + block, mask=valid, other=0))
    values = tl.join(e2m1_magnitudes(packed & 15), e2m1_magnitudes(packed >> 4))  # [BLOCKS, 16, 2]: low first
    values = tl.reshape(values, [BLOCKS, 32]) * scale[:, None]
    column = tl.arange(0, 32)
    tl.store(out_ptr + block[:, None] * 32 + column[None, :], values.to(out_ptr.dtype.element_ty),
             mask=valid[:, None])


@triton.jit
def dense_matmul_kernel(x_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr, M, N, stride_xe, stride_xm, K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, expert, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    packed_row = K // 2
    groups = K // 32
    x_base = x_ptr + expert.to(tl.int64) * stride_xe + rows[:, None] * stride_xm
    w_base = blocks_ptr + (expert.to(tl.int64) * N + cols[:, None]) * packed_row
    s_base = scales_ptr + (expert.to(tl.int64) * N + cols[:, None]) * groups
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_base + k[None, :], mask=row_ok[:, None], other=0.0)
        packed = tl.load(w_base + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :], mask=col_ok[:, None],
                         other=0).to(tl.int32)
        scale = scale_values(tl.load(s_base + (k0 // 32 + tl.arange(0, BLOCK_K // 32))[None, :],
                                     mask=col_ok[:, None], other=0))
        w = tl.join(e2m1_magnitudes(packed & 15), e2m1_magnitudes(packed >> 4))  # [N, K/2, 2]
        w = tl.reshape(w, [BLOCK_N, BLOCK_K // 32, 32]) * scale[:, :, None]
        w = tl.reshape(w, [BLOCK_N, BLOCK_K]).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    bias = tl.load(bias_ptr + expert.to(tl.int64) * N + cols, mask=col_ok, other=0.0)
    acc += bias.to(tl.float32)[None, :]
    out = out_ptr + (expert.to(tl.int64) * M + rows[:, None]) * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
