"""MXFP4-resident experts against bf16 ones at the 20b shape, one layer at a time, on one GPU.

    python tiny_gpt_oss.py --shape 20b --tokenizer path/to/o200k_harmony
    python benchmarks/bench_mxfp4_experts.py --model-dir runs/stand-ins/gpt-oss-20b-shape --out runs/bench/mxfp4.json

Times (median of CUDA-event timings, rotating over the 24 layers so that no weight sits in the cache):
- decode: the experts of one layer for 32 tokens (a decode step of workload W), every token through every expert:
  mxfp4_experts.dense_forward with each of its decode kernels ('interleaved', 'blocked', 'transposed') against
  the same math over bf16 weights (two batched matmuls, the rollout engine's bf16 decode path), replayed from a
  CUDA graph as the engine runs them (no launch overhead); with the bytes each must read and the fraction of the
  measured copy bandwidth that makes, and the kernel DENSE_KERNEL = 'auto' picks for these weights; where that is
  'transposed', also mxfp4_experts.routed_experts (each expert multiplies only its own tokens, the rows gathered
  and the outputs combined included: the engine's decode path);
- dequantisation: one layer's gate_up matrix into bf16 (the many-rows path's first step), in GB/s moved;
- training: forward and backward of one layer's experts over a micro-batch's token-expert pairs (16 x 530 tokens,
  top 4): mxfp4_experts.grouped_forward, with each of its grouped matmuls (GROUPED_MATMUL 'dequantize' and
  'fused'), against the same math over bf16 weights with torch's grouped matmul (what transformers' grouped_mm
  experts run).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model_loader  # noqa: E402
from gpu_engine import mxfp4  # noqa: E402
from gpu_engine import mxfp4_experts  # noqa: E402
from gpu_engine import mxfp4_kernels  # noqa: E402  (triton: this benchmark needs a GPU anyway)

DECODE_TOKENS = 32  # rows of a decode step of workload W
TRAIN_TOKENS = 16 * 530  # tokens of one training micro-batch of W (16 completions of a ~270-token prompt + 256)
REPEATS = 48  # timed calls per figure (two passes over the 24 layers)


def median_ms(fn, calls):
    """Median milliseconds of fn(i) over `calls` calls, each timed with CUDA events after two warm-up calls."""
    fn(0), fn(1)
    times = []
    for i in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_ms(fn, calls):
    """Milliseconds per call of fn(i), i < calls, captured once in a CUDA graph (after warm-up calls on a side
    stream, which also run the autotuners) and replayed: the median of 10 replays, divided by calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    return median_ms(lambda i: graph.replay(), 10) / calls


def routing(tokens, experts, top_k, generator):
    index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)]).cuda()
    scores = torch.softmax(torch.randn(tokens, top_k, generator=generator), -1).cuda().to(torch.bfloat16)
    return index, scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(ROOT / "runs" / "stand-ins" / "gpt-oss-20b-shape"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "mxfp4_experts.json"))
    parser.add_argument("--layers", type=int, default=8, help="layers to rotate over (each holds its bf16 copy too)")
    args = parser.parse_args()
    model = model_loader.load_model(args.model_dir, device="cuda", experts_format="mxfp4")
    layers = [layer.mlp.experts for layer in model.model.layers[:args.layers]]
    cfg = model.config
    bf16 = [(mxfp4.dequantize_mxfp4(*e.matrices()[0], torch.bfloat16).transpose(1, 2).contiguous(),
             mxfp4.dequantize_mxfp4(*e.matrices()[1], torch.bfloat16).transpose(1, 2).contiguous()) for e in layers]
    generator = torch.Generator().manual_seed(0)
    n = len(layers)

    # the card's bandwidth ceiling: a large device-to-device copy (bytes read plus written)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * 2**30 / (median_ms(lambda i: dst.copy_(src), 20) / 1e3)
    del src, dst

    h = torch.randn(DECODE_TOKENS, cfg.hidden_size, generator=generator).cuda().to(torch.bfloat16)
    index, scores = routing(DECODE_TOKENS, cfg.num_local_experts, cfg.num_experts_per_tok, generator)
    with torch.no_grad():
        auto = layers[0].dense_kernel()
        kernel_ms = {}
        for kernel in ("interleaved", "blocked", "transposed"):  # the decode kernels (mxfp4_experts.DENSE_KERNEL)
            for layer in layers:
                layer.decode_kernel = kernel
                layer.kernel_scales()  # 'transposed' keeps its copy of the scales: made here, not inside the graph
            kernel_ms[kernel] = graph_ms(lambda i: mxfp4_experts.dense_forward(layers[i % n], h, index, scores),
                                         REPEATS)
        if auto == "transposed":  # each expert multiplied by its own tokens only, as the engine's decode step does
            matrix = mxfp4_experts.routing_matrix(index, scores, cfg.num_local_experts)
            for layer in layers:
                layer.decode_kernel = auto
            tensors = [mxfp4_experts.dense_tensors(layer) for layer in layers]
            kernel_ms["transposed, routed"] = graph_ms(
                lambda i: mxfp4_experts.routed_experts(h, matrix, tensors[i % n], cfg.num_experts_per_tok,
                                                       combine_kernel=True), REPEATS)

        def bf16_dense(i):
            gate_up, down = bf16[i % n]
            e = layers[i % n]
            x = h.unsqueeze(0).expand(cfg.num_local_experts, -1, -1)
            act = mxfp4_experts.swiglu(torch.bmm(x, gate_up) + e.gate_up_proj_bias[:, None], e.limit, e.alpha)
            return torch.bmm(act, down) + e.down_proj_bias[:, None]

        bf16_ms = graph_ms(bf16_dense, REPEATS)
    values = 3 * cfg.num_local_experts * cfg.hidden_size * cfg.intermediate_size
    packed_bytes = values // 2 + values // mxfp4.BLOCK_SIZE
    tiles = {str(key): str(config) for key, config in mxfp4_kernels.transposed_matmul_kernel.cache.items()}
    result = {"card": torch.cuda.get_device_name(), "copy_bandwidth_gb_per_s": bandwidth / 1e9,
              "decode_tokens": DECODE_TOKENS, "decode_kernel_auto": auto, "transposed_tiles_chosen": tiles,
              "decode_layer_ms": {**{f"mxfp4 {k}": ms for k, ms in kernel_ms.items()}, "bf16": bf16_ms},
              "decode_layer_bandwidth_fraction": {**{f"mxfp4 {k}": packed_bytes / bandwidth / (ms / 1e3)
                                                     for k, ms in kernel_ms.items()},
                                                  "bf16": 2 * values / bandwidth / (bf16_ms / 1e3)}}

    gate_up_bytes = layers[0].gate_up_proj_blocks.numel() + layers[0].gate_up_proj_scales.numel()
    dequant_ms = median_ms(lambda i: mxfp4_experts.dequantize(*layers[i % n].matrices()[0], torch.bfloat16), REPEATS)
    result["dequantize_gate_up_ms"] = dequant_ms
    result["dequantize_gb_per_s"] = (gate_up_bytes + 2 * values * 2 // 3) / (dequant_ms / 1e3) / 1e9

    x = torch.randn(TRAIN_TOKENS, cfg.hidden_size, generator=generator).cuda().to(torch.bfloat16)
    index, scores = routing(TRAIN_TOKENS, cfg.num_local_experts, cfg.num_experts_per_tok, generator)
    grad = torch.randn_like(x)

    def train_mxfp4(i):
        inp = x.detach().requires_grad_()
        mxfp4_experts.grouped_forward(layers[i % n], inp, index, scores).backward(grad)

    def grouped_bf16(experts, weights, inp):
        """The same token-expert pairs through bf16 weights ([E, in, out]) with torch's grouped matmul: what
        transformers' grouped_mm experts compute (sorted by expert, biases, SwiGLU, routing weights, summed)."""
        gate_up, down = weights
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offsets = torch.cumsum(torch.bincount(flat, minlength=cfg.num_local_experts), 0, dtype=torch.int32)
        rows = inp.index_select(0, order // cfg.num_experts_per_tok)
        h = torch.nn.functional.grouped_mm(rows, gate_up, offs=offsets) + experts.gate_up_proj_bias[flat[order]]
        h = mxfp4_experts.swiglu(h, experts.limit, experts.alpha)
        out = torch.nn.functional.grouped_mm(h, down, offs=offsets) + experts.down_proj_bias[flat[order]]
        out = out * scores.reshape(-1)[order, None]
        unsorted = out.index_select(0, torch.argsort(order))
        return unsorted.view(-1, cfg.num_experts_per_tok, out.shape[-1]).sum(1, dtype=torch.float32).to(inp.dtype)

    def train_bf16(i):
        inp = x.detach().requires_grad_()
        grouped_bf16(layers[i % n], bf16[i % n], inp).backward(grad)

    result["train_tokens"] = TRAIN_TOKENS
    timings = {}
    for kind in ("dequantize", "fused"):  # mxfp4_experts.GROUPED_MATMUL's two ways
        os.environ[mxfp4_experts.GROUPED_MATMUL_VARIABLE] = kind
        timings[f"mxfp4 {kind}"] = median_ms(train_mxfp4, REPEATS // 2)
    os.environ.pop(mxfp4_experts.GROUPED_MATMUL_VARIABLE)
    result["train_layer_forward_backward_ms"] = {**timings, "bf16": median_ms(train_bf16, REPEATS // 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
