"""Every Triton kernel of the project builds for the cards people own, ahead of time, without a GPU.

triton ships its own ptxas, so each kernel is compiled here to a cubin for sm_80 (A100), sm_86 (RTX 3090, A10),
sm_89 (RTX 4090, L4), sm_90 (H100, H200) and sm_120 (RTX 5090), with the argument types it is launched with, and at
least one of its autotuner's tile shapes must fit that card's shared memory (the autotuner skips the others there).
The 'transposed' MXFP4 kernel is built for Hopper alone: mxfp4_experts.choose_dense_kernel takes it nowhere else
(its fp8 conversions need sm_89, its TMA loads sm_90). A kernel that only builds for Hopper fails here, not on a
user's card. Compiling is not running: tests/*_gpu.py run the kernels, on the card at hand.
"""

import pytest

triton = pytest.importorskip("triton", reason="triton not installed (pip install triton)")
from triton.backends.compiler import GPUTarget  # noqa: E402

from gpu_engine import combine_experts_kernel  # noqa: E402
from gpu_engine import decode_attention_kernel  # noqa: E402
from gpu_engine import mxfp4_kernels  # noqa: E402
from gpu_engine import swiglu_kernel  # noqa: E402

# compute capability -> shared memory a block may use there, bytes (CUDA's per-block opt-in maximum)
CARDS = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 120: 101376}
K = 2880  # gpt-oss-20b's hidden and intermediate size: the experts' input width
MATMUL = {"M": "i32", "N": "i32", "stride_xe": "i32", "stride_xm": "i32"}
GROUPED = {"x_ptr": "*bf16", "blocks_ptr": "*u8", "scales_ptr": "*u8", "bias_ptr": "*bf16", "offsets_ptr": "*i32",
           "out_ptr": "*bf16", "ROWS_BUCKET": "i32"}
KERNELS = {  # name -> (kernel, argument types, constant arguments, the cards it is built for)
    "dequantize": (mxfp4_kernels.dequantize_kernel,
                   {"blocks_ptr": "*u8", "scales_ptr": "*u8", "out_ptr": "*bf16", "n_blocks": "i32"},
                   {"BLOCKS": 64}, CARDS),
    "interleaved matmul": (mxfp4_kernels.dense_matmul_kernel,
                           {"x_ptr": "*bf16", "blocks_ptr": "*u8", "scales_ptr": "*u8", "bias_ptr": "*bf16",
                            "out_ptr": "*bf16", **MATMUL}, {"K": K, "BLOCK_M": 32}, CARDS),
    "blocked matmul": (mxfp4_kernels.blocked_matmul_kernel,
                       {"x_ptr": "*fp16", "blocks_ptr": "*u8", "scales_ptr": "*u8", "bias_ptr": "*bf16",
                        "out_ptr": "*bf16", **MATMUL}, {"K": K, "BLOCK_M": 32}, CARDS),
    "transposed matmul": (mxfp4_kernels.transposed_matmul_kernel,
                          {"x_desc": "tensordesc<fp16[32, {BLOCK_K}]>", "w_desc": "tensordesc<u8[{BLOCK_N}, {HALF_K}]>",
                           "s_desc": "tensordesc<u8[{GROUPS}, {BLOCK_N}]>", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                           "offsets_ptr": "*i32", "M": "i32", "N": "i32", "x_expert_rows": "i32", "limit": "fp32",
                           "alpha": "fp32"},
                          {"K": K, "BLOCK_M": 32, "SWIGLU": True, "ROUTED": True}, {90: CARDS[90]}),
    "grouped matmul": (mxfp4_kernels.grouped_matmul_kernel, GROUPED,
                       {"N": 2 * K, "K": K, "EXPERTS": 32, "EXPERTS_PADDED": 32, "TRANSPOSE": False, "HAS_BIAS": True},
                       CARDS),
    "grouped matmul, transposed": (mxfp4_kernels.grouped_matmul_kernel, GROUPED,
                                   {"N": K, "K": 2 * K, "EXPERTS": 32, "EXPERTS_PADDED": 32, "TRANSPOSE": True,
                                    "HAS_BIAS": False}, CARDS),
    "swiglu forward": (swiglu_kernel.swiglu_forward_kernel,
                       {"gate_up_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "limit": "fp32", "alpha": "fp32"},
                       {"BLOCK": swiglu_kernel.BLOCK}, CARDS),
    "swiglu backward": (swiglu_kernel.swiglu_backward_kernel,
                        {"gate_up_ptr": "*bf16", "grad_ptr": "*bf16", "grad_in_ptr": "*bf16", "n": "i32",
                         "limit": "fp32", "alpha": "fp32"}, {"BLOCK": swiglu_kernel.BLOCK}, CARDS),
    "decode attention": (decode_attention_kernel.decode_attention_kernel,
                         {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "sinks_ptr": "*bf16", "pos_ptr": "*i64",
                          "out_ptr": "*bf16", "scaling": "fp32", "length": "i32", "window": "i32"},
                         {"KV": 8, "GROUPS": 8, "D": 64, "BLOCK_G": 16, "BLOCK_N": 64}, CARDS),
    "combine experts": (combine_experts_kernel.combine_experts_kernel,
                        {"out_ptr": "*bf16", "routing_ptr": "*bf16", "rows_ptr": "*i32", "result_ptr": "*bf16",
                         "tokens": "i32", "hidden": "i32"},
                        {"EXPERTS": 32, "EXPERTS_PADDED": 32, "BLOCK": combine_experts_kernel.BLOCK, "ROWS": True},
                        CARDS),
}


def tile_shapes(kernel):
    """(constants, options) of each tile shape the autotuner tries, or the launch defaults for a plain kernel."""
    configs = getattr(kernel, "configs", None)
    if not configs:
        return [({}, {"num_warps": 4, "num_stages": 3})]
    return [(dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in configs]


def compile_for(kernel, arguments, constants, arch, tile, options):
    values = {**constants, **tile}
    sizes = {"BLOCK_K": values.get("BLOCK_K", 0), "HALF_K": values.get("BLOCK_K", 0) // 2,
             "GROUPS": values.get("BLOCK_K", 0) // 32, "BLOCK_N": values.get("BLOCK_N", 0)}
    signature = {name: kind.format(**sizes) for name, kind in arguments.items()}
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner wraps the JIT function
    signature.update({name: "constexpr" for name in values})
    # pointers 16-byte aligned, as the launcher specialises torch's tensors: without it triton cannot vectorise the
    # loads, nor pipeline them (cp.async), and the build here would not be the one that runs (nor its shared memory)
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in arguments.items()
               if kind.startswith("*")}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=values, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


@pytest.mark.parametrize("name", list(KERNELS))
def test_every_kernel_builds_for_the_cards_it_runs_on(name):
    kernel, arguments, constants, cards = KERNELS[name]
    for arch, shared_limit in cards.items():
        fitting, errors = None, []
        for tile, options in tile_shapes(kernel):
            try:
                compiled = compile_for(kernel, arguments, constants, arch, tile, options)
            except Exception as error:  # triton raises several types (PTXASError, CompilationError, ...)
                errors.append(f"{tile}: {type(error).__name__}: {str(error).splitlines()[-1][:200]}")
                continue
            assert compiled.asm["cubin"], f"{name}: no cubin for sm_{arch}"
            if compiled.metadata.shared <= shared_limit:
                fitting = tile
                break
            errors.append(f"{tile}: {compiled.metadata.shared} bytes of shared memory, sm_{arch} has {shared_limit}")
        assert fitting is not None, f"{name} builds for sm_{arch} in no tile shape that fits it: " + "; ".join(errors)

