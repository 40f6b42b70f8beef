"""training/memory_plan.py: what each phase of a run holds, counted against the real parts (PEFT's adapter, the rollout
engine's copies and caches on the tiny stand-in), the settings it fits to a card, and the measured peaks."""

import re

import pytest
import torch
from transformers import GptOssConfig

from training import memory_plan
import model_loader
import train_grpo
from lora_fixtures import EXPERT_PARAMETERS
from tiny_gpt_oss import GPT_OSS_20B

PROMPTS = list(range(242, 274))  # real-tokenizer lengths of the example prompts (GPT_OSS_NOTES, README)


@pytest.fixture(scope="module")
def config_20b():
    config = GptOssConfig(**GPT_OSS_20B)
    config.quantization_config = {"quant_method": "mxfp4"}
    return config


def defaults(**changes):
    return {**{name: getattr(train_grpo, name) for name in train_grpo.SETTINGS}, **changes}


def tiny_peft(lora_experts, rank=8):
    from peft import LoraConfig, get_peft_model

    from gpu_engine import expert_lora

    model = model_loader.load_model("tiny", device="cpu", dtype=torch.float32, experts_format="bf16")
    return get_peft_model(model, expert_lora.register(LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0,
        target_parameters=EXPERT_PARAMETERS if lora_experts else None)))


@pytest.mark.parametrize("lora_experts", [False, True], ids=["attention-lora", "expert-lora"])
def test_the_adapter_is_counted_as_peft_builds_it(lora_experts):
    model = tiny_peft(lora_experts)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    settings = defaults(LORA_RANK=8, LORA_EXPERTS=lora_experts)
    assert memory_plan.adapter_values(model_loader.find_config(model), settings) == trainable


@pytest.mark.parametrize("lora_experts", [False, True], ids=["attention-lora", "expert-lora"])
def test_the_engines_copies_and_cache_are_counted_as_the_engine_holds_them(lora_experts):
    """On the tiny stand-in (fp32 on a CPU: 4 bytes a value where the plan counts bf16's 2): the engine's weight
    copies (attention stacked with the LoRA's A rows, an expert LoRA's factors) and one decode state's K/V."""
    from gpu_engine import rollout_engine

    model = tiny_peft(lora_experts)
    tokenizer = model_loader.load_tokenizer("tiny")
    engine = rollout_engine.RolloutEngine(model, tokenizer)
    engine.generate([[1, 2, 3]] * 3, max_new_tokens=5)
    config = model_loader.find_config(model)
    settings = defaults(LORA_RANK=8, LORA_EXPERTS=lora_experts)
    norms = sum(t.numel() for layer in engine.weights.layers for t in (layer.input_norm[0], layer.post_norm[0]))
    held = sum(t.numel() for t in engine.weights.tensors()) - norms  # the norms' fp32 copies are tiny
    assert held * 2 == memory_plan.engine_weight_bytes(config, "bf16", settings)
    (state,) = engine.graphs.values()
    kv = sum(t.numel() * t.element_size() for t in state.k + state.v)
    logits_buffers = 4 * state.rows * config.vocab_size * 4
    assert kv // 2 == memory_plan.cache_bytes(config, rows=3, length=3 + 5) - logits_buffers


def test_the_defaults_fit_a_24_gb_card_and_expert_lora_gets_smaller_micro_batches(config_20b):
    attention = memory_plan.fit_to_card(config_20b, "mxfp4", defaults(), PROMPTS, 23.0)
    assert attention.fits and attention.settings["TRAIN_BATCH_SIZE"] == 16 and not attention.note
    experts = memory_plan.fit_to_card(config_20b, "mxfp4", defaults(LORA_EXPERTS=True), PROMPTS, 23.0)
    assert experts.fits and experts.plan.needed_gib() <= 23.0
    chosen = experts.settings
    assert chosen["TRAIN_BATCH_SIZE"] < 16 and chosen["TRAIN_BATCH_SIZE"] * chosen["GRADIENT_ACCUMULATION"] == 32
    assert "the same optimiser step" in experts.note


def apply_flags(settings, flags):
    """(settings, generation back end) after train_grpo.py flags like '--train-batch-size 8 --lora-experts false'."""
    changed, backend = dict(settings), "engine"
    for name, value in re.findall(r"--([a-z-]+) (\S+)", flags):
        if name == "generation-backend":
            backend = value
            continue
        changed[name.upper().replace("-", "_")] = value == "true" if value in ("true", "false") else int(value)
    return changed, backend


def assert_every_named_setting_fits(config, settings, note, usable):
    """Never advise a change the plan would refuse: each `...` of the message, applied, fits the card."""
    named = re.findall(r"`([^`]+)`", note)
    assert named
    for flags in named:
        changed, backend = apply_flags(settings, flags)
        fit = memory_plan.fit_to_card(config, "mxfp4", changed, PROMPTS, usable,
                                      fixed=("TRAIN_BATCH_SIZE", "GRADIENT_ACCUMULATION"), backend=backend)
        assert fit.fits, (flags, fit.note)
    return named


def test_micro_batches_set_by_hand_are_refused_with_settings_that_fit_and_each_named_one_fits(config_20b):
    settings = defaults(LORA_EXPERTS=True)
    fit = memory_plan.fit_to_card(config_20b, "mxfp4", settings, PROMPTS, 23.0,
                                  fixed=("TRAIN_BATCH_SIZE", "GRADIENT_ACCUMULATION"))
    assert not fit.fits and "These fit:" in fit.note and "23.0 GiB usable" in fit.note
    named = assert_every_named_setting_fits(config_20b, settings, fit.note, 23.0)
    assert any(flags.startswith("--train-batch-size") for flags in named)


def test_a_15_gib_card_hears_what_is_missing_as_measured(config_20b):
    """Measured on an H100 capped at 15.0 GiB: the smallest form of the run (TRL's generate, one prompt a step,
    micro-batches of one) ran out of memory in its first step, so the plan may not name it as fitting."""
    fit = memory_plan.fit_to_card(config_20b, "mxfp4", defaults(), PROMPTS, 15.0)
    assert not fit.fits and "15.0 GiB usable" in fit.note
    assert "Nothing fits: even the run's smallest form" in fit.note and "--generation-backend generate" in fit.note
    assert "running out of memory under a 15.0 GiB cap" in fit.note
    least, _ = memory_plan.smallest(defaults())
    peaks = memory_plan.plan_run(config_20b, "mxfp4", least, PROMPTS, "generate", evaluation_rows=1).peaks_gib()
    assert peaks["rollout"] + memory_plan.SAFETY_GIB > 15.0  # the rollout alone: what ran out of memory
    nothing = memory_plan.fit_to_card(config_20b, "mxfp4", defaults(), PROMPTS, 13.0)
    assert "Nothing fits: even the run's smallest form" in nothing.note and "GiB more than the card has" in nothing.note


def test_bf16_experts_on_a_24_gb_card_are_told_mxfp4_fits(config_20b):
    fit = memory_plan.fit_to_card(config_20b, "bf16", defaults(), PROMPTS, 23.0, other_format="mxfp4")
    assert not fit.fits and "`--experts-format mxfp4`" in fit.note


def test_validation_and_evaluation_passes_shrink_to_what_fits(config_20b):
    roomy = memory_plan.choose_evaluation_rows(config_20b, "mxfp4", defaults(), PROMPTS, 80.0, "engine")
    assert roomy == memory_plan.MAX_EVALUATION_ROWS
    full = memory_plan.plan_run(config_20b, "mxfp4", defaults(), PROMPTS, evaluation_rows=roomy)
    usable = full.peaks_gib()["validation"] + memory_plan.SAFETY_GIB - 0.1  # 64 rows a pass no longer fit
    tight = memory_plan.choose_evaluation_rows(config_20b, "mxfp4", defaults(), PROMPTS, usable, "engine")
    fewer = memory_plan.plan_run(config_20b, "mxfp4", defaults(), PROMPTS, evaluation_rows=tight)
    assert tight < roomy and fewer.peaks_gib()["validation"] + memory_plan.SAFETY_GIB <= usable


def test_micro_batches_keep_the_step_and_the_group_rule():
    pairs = memory_plan.micro_batches(defaults())  # 4 prompts x 8 completions
    assert pairs[0] == (32, 1) and (16, 2) in pairs and (8, 4) in pairs and (1, 32) in pairs
    assert all(size * steps == 32 and (size % 8 == 0 or 8 % size == 0) for size, steps in pairs)
    assert (12, 3) not in memory_plan.micro_batches(defaults(PROMPTS_PER_STEP=6, NUM_GENERATIONS=6))[:1]


def test_phase_peaks_return_to_the_enclosing_phase_and_keep_each_phases_largest(monkeypatch):
    allocated = {"now": 0, "peak": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: allocated.update(peak=allocated["now"]))

    def use(gib):
        allocated["now"] = gib * memory_plan.GIB
        allocated["peak"] = max(allocated["peak"], allocated["now"])

    phases = memory_plan.PhasePeaks("cuda")
    phases.enter("update")
    use(5)
    with phases.phase("rollout"):
        use(9)
        use(4)
    use(6)
    with phases.phase("rollout"):
        use(7)
    use(4)
    assert phases.current == "update"
    assert phases.gib() == {"update": 7.0, "rollout": 9.0}  # 7: what the rollout left allocated as it ended
    assert memory_plan.PhasePeaks("cpu").gib() == {}


def test_plan_gpu_memory_adopts_the_plans_micro_batches_or_exits_with_its_message(monkeypatch, config_20b):
    monkeypatch.setattr(model_loader, "check_gpu_generation", lambda *a: None)
    monkeypatch.setattr(model_loader, "usable_gpu_bytes", lambda: 23 * 2**30)
    monkeypatch.setattr(model_loader, "choose_experts_format", lambda *a: "mxfp4")
    settings = defaults(LORA_EXPERTS=True)
    lines = []
    plan = train_grpo.plan_gpu_memory(settings, config_20b, PROMPTS, (), None, lines.append)
    assert settings["TRAIN_BATCH_SIZE"] < 16 and plan.needed_gib() <= 23
    assert any("micro-batches of" in line for line in lines) and any("GiB of 23.0 usable" in line for line in lines)
    with pytest.raises(SystemExit, match="These fit: `--train-batch-size"):
        train_grpo.plan_gpu_memory(defaults(LORA_EXPERTS=True), config_20b, PROMPTS, ("TRAIN_BATCH_SIZE",), None,
                                   lines.append)


def test_the_summary_shows_each_phases_peak_beside_the_plan():
    from training.run_summary import render_summary

    summary = {"out": "runs/x", "device": "NVIDIA H100 80GB HBM3", "steps_done": 2, "train_seconds": 10.0,
               "training": {"steps": 2, "window": 1, "first_steps": {"reward": 0.1, "valid_rate": 1.0, "accuracy": 0.2},
                            "last_steps": {"reward": 0.2, "valid_rate": 1.0, "accuracy": 0.3}},
               "speed": {"seconds_per_step": 4.0, "generation_seconds_per_step": 2.0, "update_seconds_per_step": 2.0,
                         "generated_tokens_per_second": 4000.0, "peak_gpu_memory_gib": 20.0},
               "gpu_memory_gib": {"loading": 12.9, "rollout": 18.2, "update": 20.0},
               "planned_gpu_memory_gib": {"rollout": 18.5, "update": 20.3, "validation": 18.0, "evaluation": 18.0}}
    text = render_summary(summary)
    assert "Peak GPU memory allocated, by phase (planned in brackets): loading 12.9 GiB, rollout 18.2 (18.5) GiB, " \
           "update 20.0 (20.3) GiB." in text
