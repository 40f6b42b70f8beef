"""How much of an expert-LoRA update each way of rounding back to MXFP4 keeps, at equal size (4.25 bits a value).

    python benchmarks/bench_export_rounding.py --adapter-path runs/grpo-tiny --out benchmarks/results/export_rounding.json

Two cases:
- `tiny`: the adapter of a run on the tiny stand-in (`train_grpo.py --tiny`: expert LoRA, learning rate 2e-3), merged
  in fp32; besides the weights, each rounding's model is compared with the merged model on VERIFY_PROMPTS held-out
  prompts (next-token argmax agreement, largest logit difference);
- `20b`: four experts of one layer at the 20b shape (hidden = intermediate = 2880), built as the 20b stand-in builds
  its weights (normal 0.02, quantised to MXFP4: the base), plus a rank-16 update whose norm is UPDATE_SIZES times the
  weight's, the range a real run's learning rates (1e-5 .. 1e-4) leave after a few hundred steps.

Roundings (each value rounds to the nearest e2m1 grid point, ties to even, unless said otherwise):
- `base scales, never clipping` (the export before this measurement): each block keeps the base checkpoint's scale
  unless the update needs a larger one (mxfp4.quantize_mxfp4 with like_scales);
- `base scales, closest of two` (the export now): the same scale or half of it, whichever rounds the block with
  the smaller squared error, clipping the few values past 6 x scale / 2 (scale_rule='closest');
- `fresh scales`: each block's own scale, 2^ceil(log2(amax / 6)) (mxfp4.quantize_mxfp4 without like_scales);
- `stochastic, base scales`: base scales, each value rounded up or down with the probabilities that keep it on
  average (unbiased; seeded).
`update kept` = 1 - |Q(W') - W'| / |W' - W_base| (Frobenius, over all changed weights; 1 = kept exactly,
0 = an error as large as the update), `weight error` = |Q(W') - W'| / |W'|.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_engine import mxfp4  # noqa: E402

# -----------------------------------------------------------------------------
UPDATE_SIZES = (1e-3, 1e-2, 1e-1)  # |update| / |weight| of the synthetic 20b-shaped case
VERIFY_PROMPTS = 8  # held-out prompts of the tiny case's logit comparison
VERIFY_POSITIONS = 64  # last tokens of each prompt compared
SEED = 0
# -----------------------------------------------------------------------------
GRID = torch.tensor(mxfp4.E2M1_VALUES[:8])  # the e2m1 magnitudes


def round_to_grid(q, generator):
    """Values already divided by their block scale (|q| <= 6) -> an unbiased random choice between the two
    neighbouring e2m1 grid values (the nearest-value roundings are mxfp4.quantize_mxfp4's)."""
    mag = q.abs()
    upper_index = torch.searchsorted(GRID, mag.contiguous(), right=False).clamp(max=len(GRID) - 1)
    lower_index = (upper_index - 1).clamp(min=0)
    lower, upper = GRID[lower_index], GRID[upper_index]
    gap = (upper - lower).clamp(min=1e-30)
    take_upper = torch.rand(mag.shape, generator=generator) < (mag - lower) / gap
    value = torch.where(upper == lower, upper, torch.where(take_upper, upper, lower))
    return value * torch.sign(q)


def round_stochastically(w, exponents, generator):
    """w [rows, 32] fp32 with one exponent a row -> MXFP4 values rounded stochastically."""
    scale = torch.ldexp(torch.ones_like(w[:, :1]), exponents[:, None])
    return round_to_grid((w / scale).clamp(-6, 6), generator) * scale


def roundings(merged, base_scales, generator):
    """{name: rounded weight} of a merged weight [..., out, in] whose base had `base_scales` [..., out, in / 32]."""
    def rounded(**rule):
        return mxfp4.dequantize_mxfp4(*mxfp4.quantize_mxfp4(merged.float(), **rule), torch.float32)

    rows = merged.reshape(-1, mxfp4.BLOCK_SIZE).float()
    fresh = mxfp4.derive_exponents(rows.abs().amax(dim=-1))
    kept_scale = torch.maximum(fresh, base_scales.reshape(-1).to(torch.int32) - mxfp4.SCALE_BIAS)
    stochastic = round_stochastically(rows, kept_scale, generator).reshape(merged.shape)
    return {"base scales, never clipping": rounded(like_scales=base_scales),
            "base scales, closest of two": rounded(like_scales=base_scales, scale_rule="closest"),
            "fresh scales": rounded(),
            "stochastic, base scales": stochastic}


def measure(pairs):
    """pairs: [(merged W', base W, {rounding: Q(W')})] -> {rounding: {"update kept", "weight error"}}."""
    names = pairs[0][2].keys()
    result = {}
    for name in names:
        error = sum((q[name] - m).square().sum().item() for m, _, q in pairs) ** 0.5
        update = sum((m - b).square().sum().item() for m, b, _ in pairs) ** 0.5
        weight = sum(m.square().sum().item() for m, _, _ in pairs) ** 0.5
        result[name] = {"update kept": 1 - error / update, "weight error": error / weight}
    return result


def tiny_case(adapter_path, generator):
    """The tiny run's merged expert weights under each rounding, with the logit comparison."""
    from adapters import adapter_evaluation as ae
    from adapters.adapter_merge import CheckpointReader, expert_weights, local_checkpoint_dir, lora_expert_parameters
    from adapters.adapter_merge import compare_logits, prompt_logits

    adapter_dir = ae.resolve_adapter_dir(adapter_path)
    base = ae.resolve_base_model(ae.read_adapter_config(adapter_dir), "", adapter_dir)
    model, tokenizer = ae.load_adapted_model(adapter_dir, base, device="cpu", dtype=torch.float32)
    changed = lora_expert_parameters(model)
    if not changed:
        raise SystemExit(f"error: {adapter_dir} has no expert LoRA; nothing of it is rounded")
    model = model.merge_and_unload().eval()
    reader = CheckpointReader(local_checkpoint_dir(base))
    frame = ae.read_prompt_frame(str(ROOT / "data" / "dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv"),
                                 "eval", VERIFY_PROMPTS)
    prompts = frame["prompt"].tolist()
    merged_logits = prompt_logits(model, tokenizer, prompts, VERIFY_POSITIONS)
    weights = expert_weights(model)
    pairs, originals = [], {}
    for name in changed:
        param = weights[name]
        merged = param.detach().float().transpose(-1, -2)  # [E, out, in]: the checkpoint's block layout
        blocks, scales = reader.get(f"{name}_blocks"), reader.get(f"{name}_scales")
        base_w = mxfp4.dequantize_mxfp4(blocks, scales, torch.float32)
        pairs.append((merged, base_w, roundings(merged, scales, generator)))
        originals[name] = param.detach().clone()
    result = measure(pairs)
    with torch.no_grad():
        for rounding in result:
            for (merged, _, rounded), name in zip(pairs, changed):
                weights[name].copy_(rounded[rounding].transpose(-1, -2).to(weights[name].dtype))
            result[rounding].update(compare_logits(merged_logits, prompt_logits(model, tokenizer, prompts,
                                                                                VERIFY_POSITIONS)))
        for name in changed:
            weights[name].copy_(originals[name])
    return {"adapter": str(adapter_dir), "expert_weights": changed, "verify_prompts": len(prompts),
            "roundings": result}


def shaped_case(generator, experts=4, size=2880, rank=16):
    """Four 20b-shaped experts (gate_up [2 x 2880, 2880]) plus rank-16 updates of each UPDATE_SIZES."""
    weight = torch.randn(experts, 2 * size, size, generator=generator) * 0.02
    blocks, scales = mxfp4.quantize_mxfp4(weight)
    base = mxfp4.dequantize_mxfp4(blocks, scales, torch.float32)
    del weight
    cases = {}
    for relative in UPDATE_SIZES:
        a = torch.randn(experts, 2 * size, rank, generator=generator)
        b = torch.randn(experts, rank, size, generator=generator)
        update = torch.bmm(a, b)
        update *= relative * base.norm() / update.norm()
        merged = base + update
        cases[f"{relative:g}"] = measure([(merged, base, roundings(merged, scales, generator))])
        del a, b, update, merged
    return {"experts": experts, "shape": [2 * size, size], "rank": rank, "update_size_vs_weight": cases}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter-path", default=str(ROOT / "runs" / "grpo-tiny"),
                        help="a run with expert LoRA (train_grpo.py --tiny)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "export_rounding.json"))
    args = parser.parse_args()
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    result = {"tiny": tiny_case(args.adapter_path, generator), "20b": shaped_case(generator)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
