"""Which back end samples the completions, in training and in evaluation: one registry, one 'auto' rule, one prompt
tokenisation.

    backend = generation.resolve("auto", model, "cuda")        # 'engine' for a model the engine runs, else 'generate'
    rollout_func = generation.training_rollout_func(backend, tokenizer)    # GRPOTrainer's rollout_func, or None
    completions = generation.sample(backend, model, tokenizer, prompts, temperature, top_p, max_new_tokens, stop_ids)
    generation.release(model)         # let go of the engine's caches and graphs before a phase of other sizes

Back ends (BACKENDS): `engine` (rollout_engine.py: CUDA graphs on a GPU, eager on a CPU; in training plugged in as
TRL's rollout_func), `generate` (TRL's own generation in training, transformers' `generate` in evaluation) and
`continuous-batching` (TRL's transformers continuous batching in training, a GPU only; evaluation samples with
`generate`). 'auto' takes the engine on a GPU for a model the engine runs (rollout_engine.supports), else
`generate`. Prompts are already rendered Harmony text, so every back end of ours tokenises them without added
special tokens (tokenize_prompts); TRL's own paths tokenise inside TRL. Adding a back end touches this module alone.
"""

from typing import NamedTuple


class Backend(NamedTuple):
    needs_cuda: bool  # refused on a CPU
    trains_with_rollout_func: bool  # training plugs it into GRPOTrainer as rollout_func (else TRL generates)
    evaluation_sampler: str  # the BACKENDS entry whose sampler evaluation uses


BACKENDS = {
    "engine": Backend(needs_cuda=False, trains_with_rollout_func=True, evaluation_sampler="engine"),
    "generate": Backend(needs_cuda=False, trains_with_rollout_func=False, evaluation_sampler="generate"),
    "continuous-batching": Backend(needs_cuda=True, trains_with_rollout_func=False, evaluation_sampler="generate"),
}


def check_backend(name, device):
    """ValueError for a name that is neither 'auto' nor a back end, or one this device cannot run."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"generation back end {name!r} is not one of auto, {', '.join(BACKENDS)}")
    if name != "auto" and BACKENDS[name].needs_cuda and not str(device).startswith("cuda"):
        raise ValueError(f"--generation-backend {name} needs a CUDA GPU; use generate or engine")


def resolve(name, model, device):
    """The back end a name stands for on this model and device ('auto': the engine on a GPU when it runs the model)."""
    check_backend(name, device)
    if name != "auto":
        return name
    from rollout_engine import supports

    return "engine" if str(device).startswith("cuda") and supports(model) else "generate"


def tokenize_prompts(tokenizer, prompts):
    """Token ids of rendered Harmony prompts (no special tokens added: the text holds them all)."""
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


def training_rollout_func(name, tokenizer):
    """GRPOTrainer's rollout_func for back end `name`, or None where TRL generates itself."""
    if not BACKENDS[name].trains_with_rollout_func:
        return None
    from rollout_engine import engine_for

    def rollout(prompts, trainer):
        prompt_ids = tokenize_prompts(tokenizer, prompts)
        engine = engine_for(trainer.model, tokenizer)
        completions, logprobs = engine.generate(prompt_ids, trainer.max_completion_length,
                                                temperature=trainer.temperature, top_p=trainer.top_p)
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": logprobs}

    return rollout


def sample(name, model, tokenizer, prompts, temperature, top_p, max_new_tokens, stop_ids):
    """Completion token ids for each prompt, with back end `name`'s evaluation sampler (the caller seeds torch)."""
    if BACKENDS[name].evaluation_sampler == "engine":
        from rollout_engine import engine_for

        completions, _ = engine_for(model, tokenizer).generate(tokenize_prompts(tokenizer, prompts), max_new_tokens,
                                                               temperature=temperature, top_p=top_p)
        return completions
    import torch

    device = next(model.parameters()).device
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left",  # tokenize_prompts',
                        return_tensors="pt").to(device)                                   # padded on the left
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    return out[:, encoded["input_ids"].shape[1]:].tolist()


def release(model):
    """Let go of what the engine keeps between calls for `model` (captured graphs, their KV caches, weight copies);
    the next call rebuilds them. Validation and evaluation sample at other sizes than training's rollouts: releasing
    before and after them keeps either phase from holding the other's memory (memory_plan.py)."""
    from rollout_engine import engine_of

    engine = engine_of(model)
    if engine is not None:
        engine.release()
