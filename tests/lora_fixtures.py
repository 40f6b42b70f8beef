"""Small LoRA adapters on the tiny stand-in, made the way train_grpo.py saves them, for the adapter tests.

Not a test module: the test files import it (pytest puts tests/ on sys.path).
"""

import json
from pathlib import Path

import torch

HARMONY_CSV = Path(__file__).resolve().parent.parent / "data" / (
    "dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv")
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def perturb_lora_b(model, scale, seed=0):
    """Give every LoRA B matrix small random values (PEFT starts them at zero: a no-op adapter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def write_trainer_state(run_dir, steps=30):
    """A trainer_state.json whose log_history has the keys train_grpo.py logs, with a rising reward."""
    history = []
    for step in range(1, steps + 1):
        history.append({"step": step, "rewards/action_reward/mean": 0.25 + 0.004 * step, "reward": 0.1 + 0.005 * step,
                        "valid_rate": min(1.0, 0.9 + 0.003 * step), "accuracy": 0.25 + 0.003 * step, "loss": 0.0})
    (Path(run_dir) / "trainer_state.json").write_text(json.dumps({"global_step": steps, "log_history": history}))


def make_adapter(run_dir, expert_lora=False, scale=0.01, seed=0, save_tokenizer=True, training_log=True,
                 base="tiny", device="cpu"):
    """Save a perturbed LoRA adapter of `base` (the tiny stand-in by default) into `run_dir`.

    Attention only, or also the experts. On a GPU the same makes an adapter for the 20b-shaped stand-in:
    make_adapter("runs/adapter-20b", base="runs/stand-ins/gpt-oss-20b-shape", device="cuda", expert_lora=True)
    """
    from peft import LoraConfig, get_peft_model

    import model_loader

    model = model_loader.load_model(base, device=device)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_parameters=EXPERT_PARAMETERS if expert_lora else None)
    model = get_peft_model(model, config)
    perturb_lora_b(model, scale, seed)
    model.save_pretrained(str(run_dir))
    if save_tokenizer:
        model_loader.load_tokenizer(base).save_pretrained(str(run_dir))
    if training_log:
        write_trainer_state(run_dir)
    return Path(run_dir)


def make_foreign_adapter(run_dir, base_path, hidden_size=128):
    """An adapter trained on a gpt-oss with another hidden size, whose config still names `base_path`."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2, num_local_experts=4,
                          num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          vocab_size=128, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    model = get_peft_model(GptOssForCausalLM(config),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                      task_type="CAUSAL_LM"))
    perturb_lora_b(model, 0.01)
    model.save_pretrained(str(run_dir))
    config_path = Path(run_dir) / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = str(base_path)
    config_path.write_text(json.dumps(adapter_config, indent=2))
    return Path(run_dir)


def write_prompt_subset(path, rows=6, drop_columns=()):
    """A small held-out prompt file (first `rows` eval rows of the Harmony CSV), optionally without some columns."""
    import pandas as pd

    frame = pd.read_csv(HARMONY_CSV, dtype=str, keep_default_na=False)
    frame = frame[frame["split"] == "eval"].head(rows).drop(columns=list(drop_columns))
    frame.to_csv(path, index=False)
    return Path(path)


def copy_adapter(run_dir, to):
    """A copy of a run directory (without evaluation reports), to break without touching the original."""
    import shutil

    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("eval_*"))
    return Path(to)


def set_lora_b(run_dir, value):
    """Overwrite every LoRA B matrix of a saved adapter with `value` (NaN: a diverged run; 1e30: finite, too large)."""
    from safetensors.torch import load_file, save_file

    path = Path(run_dir) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for name in tensors:
        if "lora_B" in name:
            tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(run_dir)
