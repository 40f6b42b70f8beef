"""What the MXFP4 decode kernel executes per weight byte: its main loop compiled for Hopper, counted instruction by
instruction, without a GPU.

    python benchmarks/inspect_mxfp4_kernel.py                     # the tile shapes the autotuner tries, K = 2880
    python benchmarks/inspect_mxfp4_kernel.py --tiles 128x256x4x3 --out runs/bench/kernel_sass.json

Needs triton (pip install triton), not a GPU.

A decode step reads every expert's packed bytes once, so the kernel keeps up with the memory only if its threads
can issue the instructions for a byte as fast as the byte arrives. triton compiles `transposed_matmul_kernel`
(gpu_engine/mxfp4_kernels.py) ahead of time for sm_90 (triton ships ptxas and cuobjdump); the steady-state K loop is the
loop whose body holds the tensor-core instructions (HGMMA) and no global store. Per tile shape it reports registers,
shared memory, spills, the loop's instructions per thread and iteration by opcode, instructions per weight byte,
and the issue ceiling: an SM issues at most 4 warp instructions a cycle, so it dequantises at most
4 x bytes per iteration / (instructions per thread x warps) bytes a cycle, set against what the card's
bandwidth brings each SM (--bandwidth-gb-s / --sms / --clock-ghz, the H200's by default: the measured copy
bandwidth of benchmarks/RESULTS.md). A ceiling near or below 100 % means the kernel is bound by its arithmetic,
not by the memory.
"""

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# -----------------------------------------------------------------------------
ARCH = 90  # compute capability compiled for: Hopper (wgmma, TMA), where the 'transposed' kernel runs
ROWS = 32  # BLOCK_M: the token rows of a decode step of workload W
# -----------------------------------------------------------------------------


def parse_tile(text):
    """'128x256x4x3' -> (BLOCK_N, BLOCK_K, warps, stages)."""
    parts = text.split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"tile {text!r} is not BLOCK_NxBLOCK_KxWARPSxSTAGES, e.g. 128x256x4x3")
    return tuple(int(p) for p in parts)


def compile_kernel(block_n, block_k, warps, stages, k):
    """(cubin bytes, triton metadata) of transposed_matmul_kernel for one tile shape."""
    import triton
    from triton.backends.compiler import GPUTarget

    from gpu_engine import mxfp4_kernels

    signature = {"x_desc": f"tensordesc<fp16[{ROWS}, {block_k}]>",
                 "w_desc": f"tensordesc<u8[{block_n}, {block_k // 2}]>",
                 "s_desc": f"tensordesc<u8[{block_k // 32}, {block_n}]>", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                 "offsets_ptr": "*i32",
                 "M": "i32", "N": "i32", "x_expert_rows": "i32", "limit": "fp32", "alpha": "fp32",
                 "K": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                 "SWIGLU": "constexpr", "ROUTED": "constexpr"}
    constexprs = {"K": k, "BLOCK_M": ROWS, "BLOCK_N": block_n, "BLOCK_K": block_k, "SWIGLU": False, "ROUTED": False}
    source = triton.compiler.ASTSource(fn=mxfp4_kernels.transposed_matmul_kernel.fn, signature=signature,
                                       constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCH, 32),
                              options={"num_warps": warps, "num_stages": stages})
    return compiled.asm["cubin"], compiled.metadata


def disassemble(cubin):
    """(SASS instructions as (address, text), resource usage text) from triton's bundled cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
    instructions = []
    for line in sass.splitlines():
        match = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if match:
            instructions.append((int(match.group(1), 16), match.group(2)))
    return instructions, usage


def opcode(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def main_loop(instructions):
    """The body of the steady-state K loop: of the backward branches, the one whose body holds HGMMA and no global
    store (STG), the largest such; None if there is none."""
    best = None
    for address, text in instructions:
        target = re.search(r"BRA .*?0x([0-9a-f]+)", text)
        if not target or int(target.group(1), 16) >= address:
            continue
        body = [t for a, t in instructions if int(target.group(1), 16) <= a <= address]
        ops = collections.Counter(opcode(t) for t in body)
        if ops["HGMMA"] and not ops["STG"] and (best is None or len(body) > len(best)):
            best = body
    return best


def inspect(tile, k, bytes_per_sm_cycle):
    block_n, block_k, warps, stages = tile
    cubin, metadata = compile_kernel(block_n, block_k, warps, stages, k)
    instructions, usage = disassemble(cubin)
    body = main_loop(instructions)
    registers = re.search(r"REG:(\d+)", usage)
    result = {"tile": {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages},
              "registers": int(registers.group(1)) if registers else None, "shared_bytes": metadata.shared,
              "spills": sum(opcode(t) in ("LDL", "STL") for _, t in instructions)}
    if body is None:
        return result | {"main_loop": None}
    weight_bytes = block_n * block_k // 2  # one iteration's packed bytes, all threads of the program
    per_thread = weight_bytes / (32 * warps)
    ceiling = 4 * weight_bytes / (len(body) * warps)  # bytes an SM can dequantise a cycle at full issue
    ops = collections.Counter(opcode(t) for t in body)
    return result | {"main_loop": {
        "instructions_per_thread": len(body), "weight_bytes_per_thread": per_thread,
        "instructions_per_weight_byte": len(body) / per_thread,
        "issue_ceiling_bytes_per_sm_cycle": ceiling,
        "issue_ceiling_fraction_of_bandwidth": ceiling / bytes_per_sm_cycle,
        "opcodes": dict(ops.most_common())}}


def main():
    try:
        from gpu_engine import mxfp4_kernels
    except ImportError as error:
        raise SystemExit(f"error: this needs triton ({error}): pip install triton (no GPU needed)") from None

    default_tiles = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                     for c in mxfp4_kernels.transposed_configs()]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", nargs="+", type=parse_tile, default=default_tiles,
                        help="BLOCK_NxBLOCK_KxWARPSxSTAGES (default: transposed_configs(), the autotuner's choices)")
    parser.add_argument("--k", type=int, default=2880, help="inputs of the matrix (gpt-oss-20b: 2880 for both)")
    parser.add_argument("--bandwidth-gb-s", type=float, default=4027, help="copy bandwidth of the card (H200)")
    parser.add_argument("--sms", type=int, default=132, help="streaming multiprocessors of the card (H200)")
    parser.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock under load (H200 boost)")
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args()
    bytes_per_sm_cycle = args.bandwidth_gb_s / (args.sms * args.clock_ghz)
    report = {"arch": f"sm_{ARCH}", "rows": ROWS, "k": args.k, "bandwidth_bytes_per_sm_cycle": bytes_per_sm_cycle,
              "tiles": []}
    print(f"the card brings each SM {bytes_per_sm_cycle:.1f} bytes a cycle ({args.bandwidth_gb_s:.0f} GB/s, "
          f"{args.sms} SMs, {args.clock_ghz} GHz)")
    for tile in args.tiles:
        result = inspect(tile, args.k, bytes_per_sm_cycle)
        report["tiles"].append(result)
        loop = result["main_loop"]
        name = "x".join(str(v) for v in tile)
        if loop is None:
            print(f"{name}: no main loop found")
            continue
        top = ", ".join(f"{op} {n}" for op, n in list(loop["opcodes"].items())[:6])
        print(f"{name}: {result['registers']} registers, {result['shared_bytes']} B shared, {result['spills']} spills; "
              f"loop {loop['instructions_per_thread']} instructions a thread for {loop['weight_bytes_per_thread']:.0f} "
              f"bytes ({loop['instructions_per_weight_byte']:.1f} a byte: {top}); issue ceiling "
              f"{loop['issue_ceiling_bytes_per_sm_cycle']:.1f} B/cycle/SM = "
              f"{100 * loop['issue_ceiling_fraction_of_bandwidth']:.0f} % of the bandwidth")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
