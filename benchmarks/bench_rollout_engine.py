"""The rollout engine alone at the 20b shape: capture, prefill and decode-step times, and how flat the stand-in's logits are.

    python benchmarks/bench_rollout_engine.py --model-dir runs/stand-ins/gpt-oss-20b-shape --out runs/bench/engine.json

For each experts format (model_loader.EXPERTS_FORMATS: bf16, or MXFP4 kept as stored) and each experts path of the engine ('auto': dense in a decode step, the module for a prefill; 'module': the
model's grouped_mm experts module; 'dense': every token through every expert as one batched matmul) it reports
the first call (graph capture included), a full GRPO rollout (4 prompts x 8 samples x 256 tokens; the same prompts
again, and prompts not seen before, as each training step brings), and one decode
step timed over replays of the captured graph, beside the bytes such a step must read and the fraction of the card's
bandwidth ceiling (a large device-to-device copy, measured first) that its time reaches; each with the decode step's per-layer functions compiled into
fused kernels (torch.compile, inductor: the engine's default where triton is installed) and as they are ('none').

It also measures what a greedy comparison can and cannot show on random weights: the margin between the two
largest next-token logits at the end of each prompt, against the difference between the reference's own logits
for the same prompt computed alone and in a left-padded batch of 32 (bf16 rounding in other GEMM shapes).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model_loader  # noqa: E402
from gpu_engine.rollout_engine import LENGTH_BUCKET, RolloutEngine  # noqa: E402

DATA = ROOT / "data" / "dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv"
PROMPTS, SAMPLES, NEW_TOKENS = 4, 8, 256  # workload W of a GRPO step
REPLAYS = 50  # decode-step replays timed


def cuda_seconds(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def time_engine(model, tokenizer, prompt_ids, experts, compile_backend, experts_format, bandwidth, profile=False):
    engine = RolloutEngine(model, tokenizer, experts=experts,
                           compile_backend=None if compile_backend == "none" else compile_backend)
    rows = [ids for ids in prompt_ids[:PROMPTS] for _ in range(SAMPLES)]
    first, _ = cuda_seconds(lambda: engine.generate(rows, NEW_TOKENS))
    state = next(iter(engine.graphs.values()))
    rollouts = [cuda_seconds(lambda: engine.generate(rows, NEW_TOKENS))[0] for _ in range(3)]
    state.step.zero_()  # replays past the rollout's length: keep the step and positions inside their buffers
    state.pos.clamp_(max=state.length - REPLAYS - 1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        state.run()
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / REPLAYS

    # as in training, where every step brings prompts (and so prefill shapes) not seen before; groups in the same
    # cache-length bucket as the first, so that no graph is captured again while timed
    def cache_bucket(group):
        return math.ceil((max(len(ids) for ids in group) + NEW_TOKENS) / LENGTH_BUCKET)

    groups = [prompt_ids[k:k + PROMPTS] for k in range(PROMPTS, len(prompt_ids) - PROMPTS + 1, PROMPTS)]
    fresh = [g for g in groups if cache_bucket(g) == cache_bucket(prompt_ids[:PROMPTS])][:3]
    fresh_rollouts = [cuda_seconds(lambda: engine.generate([ids for ids in g for _ in range(SAMPLES)],
                                                           NEW_TOKENS))[0] for g in fresh]
    # the replays above ran at positions up to prompt + REPLAYS; a rollout's mean position is prompt + half its tokens
    needed = decode_step_bytes(model, PROMPTS * SAMPLES, max(len(p) for p in prompt_ids[:PROMPTS]) + NEW_TOKENS // 2,
                               experts_format)
    result = {"experts": experts, "compile_backend": engine.kernels.backend or "none",
              "experts_format": experts_format, "decode_step_bytes": needed,
              "decode_step_floor_ms": 1e3 * needed / bandwidth,
              "fraction_of_bandwidth_ceiling": needed / bandwidth / (step_ms / 1e3),
              "first_call_seconds": first, "capture_seconds": state.capture_seconds,
              "rollout_seconds": sorted(rollouts)[1], "rollout_seconds_new_prompts":
              sorted(fresh_rollouts)[len(fresh_rollouts) // 2] if fresh_rollouts else None,
              "decode_step_ms": step_ms,
              "generated_tokens_per_second": PROMPTS * SAMPLES * NEW_TOKENS / sorted(rollouts)[1],
              "cache_gib": engine.cache_bytes() / 2**30}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        state.step.zero_()  # after a rollout: back inside the step and position buffers, as for the replays
        state.pos.clamp_(max=state.length - REPLAYS - 1)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            with torch.no_grad():
                for _ in range(3):
                    engine._decode(state)  # eagerly: the same kernels the graph replays
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        result["kernels_per_decode_step"] = len(kernels) / 3
        result["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        print(result["profile"])
    engine.release()
    return result


def copy_bandwidth():
    """Bytes per second of a large device-to-device copy (read plus write): the card's practical bandwidth ceiling."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = [cuda_seconds(lambda: dst.copy_(src))[0] for _ in range(10)]
    del src, dst
    return 2 * 2**30 / sorted(seconds)[len(seconds) // 2]


def decode_step_bytes(model, rows, cache_positions, experts_format):
    """Bytes one decode step of `rows` rows must read: the attention, router, norm and LM-head weights, the experts
    that random top-k routing of `rows` tokens touches (expected count), and the KV cache up to `cache_positions`
    (sliding layers: their window). Embedding rows are gathered, not read whole."""
    from gpu_engine.mxfp4_experts import expert_weight_count, packed_expert_bytes

    cfg = model_loader.find_config(model)
    experts = packed_expert_bytes(cfg) if experts_format == "mxfp4" else 2 * expert_weight_count(cfg)
    rest = model_loader.weight_bytes(cfg, experts_format) - experts - 2 * cfg.vocab_size * cfg.hidden_size
    touched = 1 - (1 - cfg.num_experts_per_tok / cfg.num_local_experts) ** rows
    kv = 0
    for kind in cfg.layer_types:
        positions = min(cache_positions, cfg.sliding_window) if kind == "sliding_attention" else cache_positions
        kv += 2 * rows * cfg.num_key_value_heads * positions * cfg.head_dim * 2
    return rest + touched * experts + kv


def logprob_noise(model, tokenizer, prompt_ids, experts="auto"):
    """Engine log-probabilities of sampled tokens against the forward pass, beside the forward against itself.

    The forward is computed twice: each sequence alone, and the 32 right-padded in micro-batches of 8 as TRL's
    loss does; their difference is the reference's own bf16 noise floor on this model. Both run under the bf16
    autocast that accelerate puts around the trainer's forward.
    """
    engine = RolloutEngine(model, tokenizer, experts=experts)
    rows = [ids for ids in prompt_ids[:PROMPTS] for _ in range(SAMPLES)]
    torch.manual_seed(0)
    completions, logprobs = engine.generate(rows, NEW_TOKENS)
    engine.release()
    alone, batched = [], []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16):
        for prompt, completion in zip(rows, completions):
            ids = torch.tensor([prompt + completion], device="cuda")
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            alone.append(torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None])[:, 0].cpu())
        for first in range(0, len(rows), 8):
            seqs = [p + c for p, c in zip(rows[first:first + 8], completions[first:first + 8])]
            encoded = tokenizer.pad({"input_ids": seqs}, padding_side="right", return_tensors="pt").to("cuda")
            logits = model(**encoded).logits.float()
            for k, (prompt, completion) in enumerate(zip(rows[first:first + 8], completions[first:first + 8])):
                part = logits[k, len(prompt) - 1:len(prompt) + len(completion) - 1]
                batched.append(torch.log_softmax(part, -1).gather(
                    1, torch.tensor(completion, device="cuda")[:, None])[:, 0].cpu())
    engine_lp = [torch.tensor(lp) for lp in logprobs]

    def stats(a, b):
        diff = torch.cat([(x - y).abs() for x, y in zip(a, b)])
        return {"mean": diff.mean().item(), "p99": diff.quantile(0.99).item(), "max": diff.max().item()}

    return {"engine_vs_forward_alone": stats(engine_lp, alone), "engine_vs_forward_batched": stats(engine_lp, batched),
            "forward_alone_vs_batched": stats(alone, batched), "tokens": sum(len(c) for c in completions),
            "mean_logprob": torch.cat(alone).mean().item()}


def logit_noise(model, tokenizer, prompt_ids):
    """Top-1 minus top-2 logit per prompt (alone), and |alone - batched| of the same logits."""
    encoded = tokenizer.pad({"input_ids": prompt_ids}, padding_side="left", return_tensors="pt").to("cuda")
    with torch.no_grad():
        batched = model(**encoded).logits[:, -1].float()
        margins, diffs = [], []
        for row, ids in enumerate(prompt_ids):
            alone = model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].float()
            top = alone.topk(2).values
            margins.append((top[0] - top[1]).item())
            diffs.append((alone - batched[row]).abs().max().item())
            del alone
    return {"top1_minus_top2": {"median": float(torch.tensor(margins).median()), "min": min(margins)},
            "alone_vs_batched_max_abs": {"median": float(torch.tensor(diffs).median()), "max": max(diffs)},
            "rows_where_noise_exceeds_margin": sum(d > m for d, m in zip(diffs, margins))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(ROOT / "runs" / "stand-ins" / "gpt-oss-20b-shape"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "engine.json"))
    parser.add_argument("--experts", nargs="+", default=["auto", "module"], choices=["auto", "module", "dense"])
    parser.add_argument("--compile", nargs="+", default=["inductor", "none"], choices=["inductor", "none"],
                        help="torch.compile backend of the decode step's per-layer functions")
    parser.add_argument("--profile", action="store_true", help="also print the top kernels of three decode steps")
    parser.add_argument("--experts-format", nargs="+", default=["bf16", "mxfp4"], choices=["bf16", "mxfp4"],
                        help="how the experts are held (model_loader.EXPERTS_FORMATS); one model loaded after another")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="fp32: only the log-probability comparison (the 20b shape takes ~84 GB in fp32)")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    tokenizer = model_loader.load_tokenizer(args.model_dir)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    prompts = pd.read_csv(DATA, keep_default_na=False)["prompt"].tolist()[:32]
    prompt_ids = tokenizer(text=prompts)["input_ids"]
    bandwidth = copy_bandwidth()
    result = {"card": torch.cuda.get_device_name(), "dtype": args.dtype, "copy_bandwidth_gb_per_s": bandwidth / 1e9,
              "prompt_tokens": [len(p) for p in prompt_ids[:PROMPTS]], "engine": []}
    for experts_format in args.experts_format:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = get_peft_model(model_loader.load_model(args.model_dir, device="cuda", dtype=dtype,
                                                       experts_format=experts_format),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
        result[f"loaded_gib_{experts_format}"] = torch.cuda.memory_allocated() / 2**30
        if args.dtype == "bf16":
            result["engine"] += [time_engine(model, tokenizer, prompt_ids, experts, backend, experts_format, bandwidth,
                                             args.profile)
                                 for experts in args.experts for backend in args.compile]
            result[f"logit_noise_{experts_format}"] = logit_noise(model, tokenizer, prompt_ids)
        # in fp32 the dense experts path (transformers' grouped_mm fallback for fp32 is not graph-capturable)
        result[f"logprob_noise_{experts_format}"] = logprob_noise(model, tokenizer, prompt_ids,
                                                                  "auto" if args.dtype == "bf16" else "dense")
        del model
        print(json.dumps({k: v for k, v in result.items() if k != "engine"}, indent=1), flush=True)
        for row in result["engine"]:
            print({k: v for k, v in row.items() if k != "profile"}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
