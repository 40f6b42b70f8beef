"""Build the gpt-oss-20b-shaped stand-in on the GPU, load it through the shared loader, generate a few tokens.

    python benchmarks/bench_load_20b.py --model-dir runs/stand-ins/gpt-oss-20b-shape --out runs/bench/load_20b.json

Reports (and writes as JSON): build seconds (skipped when the directory already holds a build), checkpoint size,
load seconds through model_loader.load_model (MXFP4 experts dequantised to bf16), peak GPU
memory after loading, and the time to generate NEW_TOKENS greedy tokens for one Harmony prompt.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harmony  # noqa: E402
import model_loader  # noqa: E402
import tiny_gpt_oss  # noqa: E402

NEW_TOKENS = 16  # tokens generated after loading


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(tiny_gpt_oss.STAND_IN_DIR / "gpt-oss-20b-shape"))
    parser.add_argument("--out", default="runs/bench/load_20b.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (the 20b shape is 39 GiB in bf16)")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    model_dir = Path(args.model_dir)
    if not (model_dir / "recipe.json").is_file():
        start = time.time()
        tiny_gpt_oss.build_20b(model_dir)
        result["build_seconds"] = round(time.time() - start, 1)
    result["checkpoint_gib"] = round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**30, 2)
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    model = model_loader.load_model(str(model_dir), experts_format="bf16")
    torch.cuda.synchronize()
    result["load_seconds"] = round(time.time() - start, 1)
    result["parameters_billion"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
    result["peak_gpu_memory_after_load_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    tokenizer = model_loader.load_tokenizer(str(model_dir))
    prompt = harmony.render_prompt(tokenizer, "Tank: 500 of 1000 kWh (50%), half full.", "low", "2025-05-05")
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to("cuda")
    start = time.time()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    torch.cuda.synchronize()
    result["generate_seconds"] = round(time.time() - start, 2)
    result["generated_tokens"] = int(out.shape[1] - inputs["input_ids"].shape[1])
    result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
