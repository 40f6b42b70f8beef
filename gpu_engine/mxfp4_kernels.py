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


def dense_configs():
    """Tile shapes tried once per weight shape (triton.autotune): with few rows the kernel streams the weights and
    dequantises every value once, so the tiles differ in how many weight bytes a program keeps in flight."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=stages)
            for n, k, w, stages in ((64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (32, 128, 4, 4),
                                    (128, 128, 8, 3))]


@triton.autotune(configs=dense_configs(), key=["N", "K", "BLOCK_M"])
@triton.jit
def dense_matmul_kernel(x_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr, M, N, stride_xe, stride_xm,
                        K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = x[e] W_e^T + bias_e for one expert e and BLOCK_N output columns per program, W_e as MXFP4: each
    [BLOCK_N, BLOCK_K] weight tile is dequantised in registers (codes interleaved back into input order, scaled per
    block of 32) and multiplied on the tensor cores; inputs past K are masked (K need not divide into tiles)."""
    pid_n, expert, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    x_base = x_ptr + expert.to(tl.int64) * stride_xe + rows[:, None] * stride_xm
    w_base = blocks_ptr + (expert.to(tl.int64) * N + cols[:, None]) * (K // 2)
    s_base = scales_ptr + (expert.to(tl.int64) * N + cols[:, None]) * (K // 32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_base + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
        pair = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_base + pair[None, :], mask=col_ok[:, None] & (pair < K // 2)[None, :],
                         other=0).to(tl.int32)
        group = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        scale = scale_values(tl.load(s_base + group[None, :], mask=col_ok[:, None] & (group < K // 32)[None, :],
                                     other=0))
        w = tl.join(e2m1_magnitudes(packed & 15), e2m1_magnitudes(packed >> 4))  # [N, K/2, 2]: low nibble first
        w = tl.reshape(w, [BLOCK_N, BLOCK_K // 32, 32]) * scale[:, :, None]
        acc = tl.dot(x, tl.trans(tl.reshape(w, [BLOCK_N, BLOCK_K]).to(x.dtype)), acc)
    bias = tl.load(bias_ptr + expert.to(tl.int64) * N + cols, mask=col_ok, other=0.0)
    acc += bias.to(tl.float32)[None, :]
    out = out_ptr + (expert.to(tl.int64) * M + rows[:, None]) * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def blocked_configs():
    """Tile shapes for blocked_matmul_kernel (triton.autotune, once per weight shape)."""
    return [triton.Config({"BLOCK_N": n, "UNROLL": u}, num_warps=w, num_stages=stages)
            for n, u, w, stages in ((64, 2, 4, 3), (64, 4, 4, 3), (128, 2, 4, 3), (128, 4, 8, 3), (32, 4, 4, 4))]


@triton.jit
def fp16_times_2_to_14(codes):
    """e2m1 codes (low 4 bits of an int16) -> fp16 whose value is the code's value times 2^-14: the 3 magnitude bits
    land on the exponent's two low bits and the mantissa's top bit (exact, subnormals included), bit 3 on the sign."""
    return (((codes & 7) << 9) | ((codes & 8) << 12)).to(tl.float16, bitcast=True)


@triton.autotune(configs=blocked_configs(), key=["N", "K", "BLOCK_M"])
@triton.jit
def blocked_matmul_kernel(x_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr, M, N, stride_xe, stride_xm,
                          K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr):
    """out[e] = x[e] W_e^T + bias_e like dense_matmul_kernel, with less arithmetic per weight: x comes as fp16 with
    its even and odd inputs in two halves ([.., 2, K/2]); each 32-input block's codes become fp16 by bit moves alone
    (value x 2^-14), are multiplied on the tensor cores without their scale, and the block's partial sum is scaled
    once per output (2^(scale - 127 + 14), fp32) before it joins the accumulator."""
    pid_n, expert, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    byte = tl.arange(0, 16)
    x_even = x_ptr + expert.to(tl.int64) * stride_xe + rows[:, None] * stride_xm
    w_base = blocks_ptr + (expert.to(tl.int64) * N + cols[:, None]) * (K // 2)
    s_base = scales_ptr + (expert.to(tl.int64) * N + cols) * (K // 32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, K // 32, UNROLL):
        for u in tl.static_range(UNROLL):
            g = g0 + u
            ok = g < K // 32
            pair = g * 16 + byte  # the block's 16 bytes: inputs 2 * pair (low nibble) and 2 * pair + 1 (high)
            xe = tl.load(x_even + pair[None, :], mask=row_ok[:, None] & ok, other=0.0)
            xo = tl.load(x_even + K // 2 + pair[None, :], mask=row_ok[:, None] & ok, other=0.0)
            packed = tl.load(w_base + pair[None, :], mask=col_ok[:, None] & ok, other=0).to(tl.int16)
            low = fp16_times_2_to_14(packed)
            high = fp16_times_2_to_14(packed >> 4)
            part = tl.dot(xo, tl.trans(high), tl.dot(xe, tl.trans(low)))
            scale_byte = tl.load(s_base + g, mask=col_ok & ok, other=0).to(tl.int32)
            # 2^(byte - 127 + 14) as float32 bits: exact for bytes up to 240 (values below 2^114; a bf16 model's weights
            # that large would already be infinite in its matmuls)
            scale = ((scale_byte + 14) << 23).to(tl.float32, bitcast=True)
            acc += part * scale[None, :]
    bias = tl.load(bias_ptr + expert.to(tl.int64) * N + cols, mask=col_ok, other=0.0)
    acc += bias.to(tl.float32)[None, :]
    out = out_ptr + (expert.to(tl.int64) * M + rows[:, None]) * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# -- 'transposed': the weights as the tensor cores' left operand, straight from registers (Hopper) -----------------


@triton.jit
def fp16_codes_of_bytes(packed):
    """uint8 codes -> (low nibble, high nibble) as fp16 of value x 2^-6, four bytes an instruction group: each nibble
    becomes an e4m3 byte by bit moves alone (sign to bit 7, the 3 magnitude bits to the exponent's two low bits and
    the mantissa's top bit: value x 2^-6, exact, subnormals included), and the hardware converts e4m3 pairs to fp16
    pairs (cvt, sm_89 or newer): 9 integer operations in PTX (7 in SASS, where masks and ors fuse) and 4 conversions
    for 8 values. Elementwise, so triton may hand it any four bytes of a thread."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 lo, hi, t, u;
        .reg .b16 l01, l23, h01, h23;
        shl.b32 t, $4, 4; shl.b32 u, $4, 2;
        and.b32 t, t, 0x80808080; and.b32 u, u, 0x1C1C1C1C; or.b32 lo, t, u;
        shr.b32 t, $4, 2; and.b32 t, t, 0x1C1C1C1C; and.b32 u, $4, 0x80808080; or.b32 hi, t, u;
        mov.b32 {l01, l23}, lo;
        mov.b32 {h01, h23}, hi;
        cvt.rn.f16x2.e4m3x2 $0, l01;
        cvt.rn.f16x2.e4m3x2 $1, l23;
        cvt.rn.f16x2.e4m3x2 $2, h01;
        cvt.rn.f16x2.e4m3x2 $3, h23;
        }
        """,
        constraints="=r,=r,=r,=r,r", args=[packed], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """fp32 x rounded to dtype and back: one eager op's rounding of its result."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def rounded_swiglu(gate, up, limit, alpha, dtype: tl.constexpr):
    """mxfp4_experts.swiglu of float32 gate and up values as eager torch computes it in `dtype`: the clamps (a NaN
    stays NaN, as in torch's clamp), then (up + 1) * (gate * sigmoid(gate * alpha)) with every step rounded to dtype
    as those eager ops round it; the last product is returned in float32, for the caller to round."""
    gate = tl.minimum(gate, limit, propagate_nan=tl.PropagateNan.ALL)
    up = tl.minimum(tl.maximum(up, -limit, propagate_nan=tl.PropagateNan.ALL), limit, propagate_nan=tl.PropagateNan.ALL)
    up_plus_one = rounded(up + 1.0, dtype)
    gated = rounded(gate * rounded(tl.sigmoid(rounded(gate * alpha, dtype)), dtype), dtype)
    return up_plus_one * gated


def set_transposed_block_shapes(nargs):
    """triton.autotune pre-hook: the TMA descriptors' tile shapes follow the config being run."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"] // 2]
    nargs["s_desc"].block_shape = [nargs["BLOCK_K"] // 32, nargs["BLOCK_N"]]


def transposed_configs():
    """Tile shapes for transposed_matmul_kernel (triton.autotune, once per weight shape and row tile). Every
    program reads all of its expert's input rows, so wider weight tiles (BLOCK_N) read them fewer times over."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=stages,
                          pre_hook=set_transposed_block_shapes)
            for n, k, w, stages in ((64, 128, 4, 4), (64, 128, 4, 3), (64, 256, 4, 2), (64, 256, 4, 3),
                                    (128, 128, 4, 3), (128, 128, 4, 4), (128, 256, 4, 3), (128, 64, 4, 4),
                                    (128, 128, 8, 3), (256, 64, 8, 4), (256, 128, 8, 3))]


@triton.autotune(configs=transposed_configs(), key=["N", "K", "BLOCK_M", "SWIGLU", "ROUTED"])
@triton.jit
def transposed_matmul_kernel(x_desc, w_desc, s_desc, bias_ptr, out_ptr, offsets_ptr, M, N, x_expert_rows, limit, alpha,
                             K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             SWIGLU: tl.constexpr = False, ROUTED: tl.constexpr = False):
    """out[e] = x[e] W_e^T + bias_e computed as its transpose, W_e x[e]^T, so that the dequantised weight tile is
    the tensor cores' left operand, which Hopper's wgmma reads from registers (the right one must sit in shared
    memory: there, the few token rows arrive by TMA). Weight bytes and scale bytes arrive by TMA too; the bytes
    become fp16 codes of value x 2^-6 (fp16_codes_of_bytes); each 32-input block is then multiplied by
    2^(byte - 113) in fp16, so the weights enter the tensor cores as value x 2^(byte - 119) (exact for scale bytes
    in mxfp4_experts.TRANSPOSED_SCALE_BYTES, checked there before this kernel is chosen) and the fp32 sums are
    scaled by 2^-8 once at the end.

    x_desc: fp16 inputs [rows, K] whose every 32-input block is permuted (mxfp4_experts.permute_for_transposed:
    column 16h + 8j + 2c + i holds input 8c + 4j + 2i + h), so that each conversion's fp16 pair (the low nibbles of
    bytes 4c + 2j and 4c + 2j + 1, or their high nibbles) is already the pair of neighbouring values the tensor
    cores expect in one register: no byte regrouping between the conversion and the multiply. x_expert_rows: 0 when
    all experts share the rows, else each expert's row count. w_desc: the blocks as [E * N, K / 2] bytes. s_desc:
    the scales as [E * K / 32, N] (mxfp4_experts.scales_for_transposed): a tile's scales come as one TMA copy of
    [BLOCK_K / 32, BLOCK_N] bytes, already in shared memory when the tile is converted. A tile past an expert's last
    block reads the next expert's scales, or zeros past the last expert: finite factors for weights that TMA fills
    with zeros there.

    ROUTED: each expert multiplies only the rows routed to it (mxfp4_experts.routed_experts): x holds the routed
    rows grouped by expert, expert e's in rows offsets_ptr[e] .. offsets_ptr[e + 1], taken BLOCK_M at a time (grid
    axis 2), and out gets one row per x row (x_expert_rows and M unused); a program whose tile starts past its
    expert's rows returns at once, reading no weight byte. Fewer rows per tile keep the tensor cores' share of the
    loop small. offsets_ptr is read only when ROUTED.

    SWIGLU: out is instead the gate_up matrix's activation as the down matrix's call of this kernel reads it:
    each output pair (gate, up) rounded to the bias' dtype first, as the plain path stores it, then
    (clamp(up) + 1) * clamp(gate) * sigmoid(alpha * clamp(gate)) with every step rounded to the bias' dtype, as
    the plain path and the training forward round it (mxfp4_experts.swiglu), converted to fp16 as
    kernel_input converts it and stored in permute_for_transposed's order: [E, M, N / 2]."""
    pid_n, expert, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if ROUTED:
        start = tl.load(offsets_ptr + expert)
        rows_left = tl.load(offsets_ptr + expert + 1) - start - pid_m * BLOCK_M
        if rows_left > 0:
            row = start + pid_m * BLOCK_M
            transposed_tile(x_desc, w_desc, s_desc, bias_ptr, out_ptr, N, limit, alpha, pid_n, expert, row, row,
                            rows_left, K, BLOCK_M, BLOCK_N, BLOCK_K, SWIGLU)
    else:
        transposed_tile(x_desc, w_desc, s_desc, bias_ptr, out_ptr, N, limit, alpha, pid_n, expert,
                        expert * x_expert_rows, expert * M, M, K, BLOCK_M, BLOCK_N, BLOCK_K, SWIGLU)


@triton.jit
def transposed_tile(x_desc, w_desc, s_desc, bias_ptr, out_ptr, N, limit, alpha, pid_n, expert, x_row, out_row,
                    rows_left, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SWIGLU: tl.constexpr):
    """transposed_matmul_kernel's work for one program: output columns pid_n * BLOCK_N.. of `expert` for the
    BLOCK_M input rows from x_row on, the first rows_left of them stored from out row out_row on."""
    n0 = pid_n * BLOCK_N
    groups: tl.constexpr = BLOCK_K // 32
    cols = n0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K // 2, BLOCK_K // 2):
        # [n, block, c, j, i]: byte 4c + 2j + i of a block's 16 holds inputs 8c + 4j + 2i (low nibble) and + 1
        packed = tl.reshape(w_desc.load([expert * N + n0, k0]), [BLOCK_N, groups, 4, 2, 2])
        scale_byte = tl.trans(s_desc.load([expert * (K // 32) + k0 // 16, n0])).to(tl.int16)  # [n, block]
        factor = ((scale_byte - 98) << 10).to(tl.float16, bitcast=True)  # fp16 bits of 2^(byte - 113)
        low, high = fp16_codes_of_bytes(packed)
        w = tl.join(low, high) * factor[:, :, None, None, None, None]  # [n, block, c, j, i, nibble]
        w = tl.reshape(tl.permute(w, [0, 1, 5, 3, 2, 4]), [BLOCK_N, BLOCK_K])  # the permuted input order
        x = x_desc.load([x_row, 2 * k0])
        acc = tl.dot(w, tl.trans(x), acc)
    acc = acc * (1.0 / 256.0)  # the weights entered as value x 2^(byte - 119): back to value x 2^(byte - 127)
    col_ok = cols < N
    bias = tl.load(bias_ptr + expert.to(tl.int64) * N + cols, mask=col_ok, other=0.0)
    acc += bias.to(tl.float32)[:, None]
    rows = tl.arange(0, BLOCK_M)
    if SWIGLU:
        # gate_up's columns alternate gate, up: split the pairs, each value rounded as the plain path stores it
        stored = acc.to(bias_ptr.dtype.element_ty).to(tl.float32)
        pairs = tl.permute(tl.reshape(stored, [BLOCK_N // 2, 2, BLOCK_M]), [0, 2, 1])
        gate, up = tl.split(pairs)
        # each step rounded to the bias' dtype, as the plain path's (and the training forward's) bf16 ops round it
        act = rounded_swiglu(gate, up, limit, alpha, bias_ptr.dtype.element_ty)
        act = act.to(bias_ptr.dtype.element_ty).to(tl.float16)
        # column j of the activation -> its place in permute_for_transposed's order (input 8c + 4j + 2i + h of a
        # block sits at 16h + 8j + 2c + i)
        j = n0 // 2 + tl.arange(0, BLOCK_N // 2)
        r = j % 32
        place = j - r + 16 * (r % 2) + 8 * ((r // 4) % 2) + 2 * (r // 8) + (r // 2) % 2
        out = out_ptr + (out_row.to(tl.int64) + rows[None, :]) * (N // 2) + place[:, None]
        tl.store(out, act, mask=(rows < rows_left)[None, :] & (j < N // 2)[:, None])
    else:
        out = out_ptr + (out_row.to(tl.int64) + rows[None, :]) * N + cols[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows < rows_left)[None, :] & col_ok[:, None])


# -- 'fused' grouped matmul: many rows grouped by expert, the weights dequantised tile by tile -----------------------


@triton.jit
def mxfp4_weight_tile(blocks_ptr, scales_ptr, expert, rows, row_ok, k0, WEIGHT_ROWS: tl.constexpr,
                      WIDTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """Rows `rows` (BLOCK_R of them) of expert `expert`'s weight [WEIGHT_ROWS, WIDTH] as float32, the inputs k0 ..
    k0 + BLOCK_W (a multiple of 32, k0 too; inputs past WIDTH and rows not row_ok read as 0)."""
    pair = k0 // 2 + tl.arange(0, BLOCK_W // 2)
    group = k0 // 32 + tl.arange(0, BLOCK_W // 32)
    row = expert.to(tl.int64) * WEIGHT_ROWS + rows
    packed = tl.load(blocks_ptr + row[:, None] * (WIDTH // 2) + pair[None, :],
                     mask=row_ok[:, None] & (pair < WIDTH // 2)[None, :], other=0).to(tl.int32)
    scale_byte = tl.load(scales_ptr + row[:, None] * (WIDTH // 32) + group[None, :],
                         mask=row_ok[:, None] & (group < WIDTH // 32)[None, :], other=0)
    scale = (scale_byte.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2^(byte - 127); byte 0 -> 0
    # each nibble's sign and 3 magnitude bits straight into float32 bits (fp32_times_2_to_126), both from the byte
    low = ((packed & 7) << 22) | ((packed & 8) << 28)
    high = ((packed & 0x70) << 18) | ((packed & 0x80) << 24)
    w = tl.join(low.to(tl.float32, bitcast=True), high.to(tl.float32, bitcast=True))  # [R, W/2, 2]: low first
    w = tl.reshape(w * 2.0**126, [BLOCK_R, BLOCK_W // 32, 32]) * scale[:, :, None]
    return tl.reshape(w, [BLOCK_R, BLOCK_W])


def grouped_configs():
    """Tile shapes for grouped_matmul_kernel (triton.autotune, once per weight shape and direction): hundreds of rows
    an expert, so each weight tile is dequantised once for BLOCK_M rows; more rows a tile, less dequantisation per
    product, more rows wasted past an expert's last (a W micro-batch gives each expert ~1,000). One BLOCK_K for all:
    every shape then sums each output's products in the same order, whichever the autotuner picks."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=stages)
            for m, n, k, w, stages in ((128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 64, 64, 4, 4),
                                       (64, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                       (64, 64, 64, 4, 4))]


@triton.jit
def grouped_tile(offsets_ptr, tile, EXPERTS: tl.constexpr, EXPERTS_PADDED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Which expert's rows row tile number `tile` covers: the tiles are laid out expert after expert, ceil(rows /
    BLOCK_M) for each (offsets_ptr [EXPERTS + 1]: expert e's rows are offsets[e] .. offsets[e + 1]). Returns (expert,
    its first row of the tile, the expert's end row); expert == EXPERTS past the last tile."""
    e = tl.arange(0, EXPERTS_PADDED)
    starts = tl.load(offsets_ptr + e, mask=e < EXPERTS, other=0)
    ends = tl.load(offsets_ptr + e + 1, mask=e < EXPERTS, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tiles_through = tl.cumsum(tiles, 0)  # tiles of experts 0 .. e
    expert = tl.sum((tiles_through <= tile).to(tl.int32), 0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tiles_through - tiles, 0), 0)
    start = tl.sum(tl.where(mine, starts, 0), 0)
    end = tl.sum(tl.where(mine, ends, 0), 0)
    return expert, start + (tile - first_tile) * BLOCK_M, end


@triton.autotune(configs=grouped_configs(), key=["N", "K", "TRANSPOSE", "ROWS_BUCKET"])
@triton.jit
def grouped_matmul_kernel(x_ptr, blocks_ptr, scales_ptr, bias_ptr, offsets_ptr, out_ptr, ROWS_BUCKET, N: tl.constexpr,
                          K: tl.constexpr, EXPERTS: tl.constexpr, EXPERTS_PADDED: tl.constexpr,
                          TRANSPOSE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r] = x[r] W_e^T (+ bias_e) for rows r grouped by expert (expert e's rows offsets[e] .. offsets[e + 1]),
    W_e [N, K] as MXFP4 blocks and scales [E, N, K / 32, ...]; TRANSPOSE: out[r] = x[r] W_e instead, W_e [K, N] as
    blocks [E, K, N / 32, ...] (the input gradient of the former). x [rows, K], out [rows, N], one dtype (bf16 on a
    GPU); accumulated in fp32. ROWS_BUCKET (the rows an expert gets on average, to a power of two) is read by the
    autotuner alone: a prefill's few hundred rows an expert and a training micro-batch's thousand get their own tiles.

    Each weight tile is dequantised in registers from its packed bytes (never a bf16 copy of the matrix in memory)
    and multiplied on the tensor cores by BLOCK_M rows. Grid (N tiles, row tiles): the row tiles of each expert in
    turn (grouped_tile), at most ceil(rows / BLOCK_M) + E of them, so the grid needs no host sync on the counts;
    programs past the last tile return at once."""
    pid_n, tile = tl.program_id(0), tl.program_id(1)
    expert, row0, row_end = grouped_tile(offsets_ptr, tile, EXPERTS, EXPERTS_PADDED, BLOCK_M)
    if expert < EXPERTS:
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < row_end, cols < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
            if TRANSPOSE:  # weight rows k, their inputs (packed) pid_n * BLOCK_N ..
                w = mxfp4_weight_tile(blocks_ptr, scales_ptr, expert, k, k < K, pid_n * BLOCK_N, K, N, BLOCK_K,
                                      BLOCK_N)
                acc = tl.dot(x, w.to(x.dtype), acc)
            else:  # weight rows cols, their inputs k0 ..
                w = mxfp4_weight_tile(blocks_ptr, scales_ptr, expert, cols, col_ok, k0, N, K, BLOCK_N, BLOCK_K)
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert.to(tl.int64) * N + cols, mask=col_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        out = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
