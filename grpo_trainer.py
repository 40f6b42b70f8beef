"""Every change this project makes to TRL's GRPOTrainer, in one subclass, and the internals it relies on, checked.

    trainer = TesGRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=..., processing_class=...,
                             generation_backend="engine", base_model_id="tiny")     # train_grpo.make_trainer

What it changes (each by overriding the method the documented way, never by assigning to an instance):
- `_get_per_token_logps_and_entropies`: on a CPU, completion_scoring.py scores a GRPO group's prompt once and
  projects only the completion positions; on every other device, a model wrapped for several processes and
  multimodal inputs, TRL's own chunked path;
- `_generate`: each step's generation seconds and generated tokens are logged (TRL times generation for wandb
  only), and transformers' continuous batching returning nothing (its out-of-memory) becomes GenerationFailed;
- `_save_checkpoint` / `_get_output_dir`: a checkpoint is complete or absent: it is written into a hidden
  `.checkpoint-partial-*` directory in OUT and renamed into place when done, its adapter naming a base that another
  checkout finds again (run_directory.record_base); under `accelerate launch` every process writes its part there
  and the main process renames it once all are done;
- `_load_optimizer_and_scheduler`: a run of several CPU processes (gloo) resumes under transformers 5.17 too, whose
  Trainer asks torch.load for the indexed device 'cpu:0', which it cannot restore;
- `log`: a metric with no value in the window (a reward no completion earned: TRL would log None, which
  TensorBoard refuses with a warning per step) is left out; the mean reward of such a step is absent, not zero.
`save_checkpoint_now()` is the public way to save one (train_grpo.py on Ctrl-C).

library_internals.TRAINER lists every private TRL / transformers name used here; a trainer checks them when it is
built and stops with one message naming the missing or changed one, the installed versions and the tested ones,
instead of training on with a silently different behaviour.
"""

import dataclasses
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from trl import GRPOTrainer

import completion_scoring
import library_internals
import memory_plan
import run_directory
from library_internals import LibraryMismatch  # noqa: F401  (what a failed check raises)


def check_internals():
    """library_internals.check of everything the subclass relies on (TRAINER)."""
    library_internals.check(library_internals.TRAINER)

class GenerationFailed(RuntimeError):
    """Generation gave no usable completions (transformers' continuous batching logs its out-of-memory and returns
    nothing, and TRL then fails on the empty result)."""


class TesGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with this project's changes (see the module docstring)."""

    def __init__(self, *args, generation_backend, base_model_id, memory_phases=None, **kwargs):
        check_internals()
        self.generation_backend = generation_backend
        self.base_model_id = base_model_id  # what saved adapters record as their base (model_loader.portable_model_id)
        # memory_plan.PhasePeaks: generation is the 'rollout' phase, the rest of a step the phase current around it
        self.memory_phases = memory_phases or memory_plan.PhasePeaks("cpu")
        self.staging_dir = None  # the hidden directory a checkpoint is being written into
        super().__init__(*args, **kwargs)

    # -- scoring ---------------------------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        # a model wrapped for several processes (DDP) must be called through its wrapper, which syncs the gradients
        wrapped = self.accelerator.unwrap_model(model) is not model
        if input_ids.device.type != "cpu" or wrapped or any(x is not None for x in extra.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        return completion_scoring.score_completions(model, input_ids, attention_mask, logits_to_keep,
                                                    batch_size or input_ids.size(0), self.temperature,
                                                    compute_entropy, compute_aux_loss, self.accelerator.autocast)

    # -- generation ------------------------------------------------------------------------------------------------
    def _generate(self, prompts, *args, **kwargs):
        import torch

        start = time.perf_counter()
        try:
            with self.memory_phases.phase("rollout"):
                result = super()._generate(prompts, *args, **kwargs)
        except (IndexError, RuntimeError) as error:
            if self.generation_backend != "continuous-batching" or isinstance(error, torch.OutOfMemoryError):
                raise
            raise GenerationFailed(f"continuous batching returned no completions ({error.__class__.__name__}: "
                                   f"{error}); its log above says why, usually 'out of memory'") from error
        self._log_metric("timing/generation_seconds", time.perf_counter() - start)
        self._log_metric("timing/generated_tokens", float(sum(len(ids) for ids in result[1])))
        return result

    # -- checkpoints, complete or absent ---------------------------------------------------------------------------
    def _get_output_dir(self, trial=None):
        return str(self.staging_dir) if self.staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        from accelerate.utils import broadcast_object_list

        out, processes = Path(self.args.output_dir), self.accelerator
        staging = [tempfile.mkdtemp(prefix=run_directory.PARTIAL, dir=out) if processes.is_main_process else None]
        if processes.num_processes > 1:
            broadcast_object_list(staging)
        self.staging_dir = Path(staging[0])
        try:
            super()._save_checkpoint(model, trial)
        finally:
            staging, self.staging_dir = self.staging_dir, None
        processes.wait_for_everyone()
        if not processes.is_main_process:
            return
        name = f"checkpoint-{self.state.global_step}"
        run_directory.record_base(staging / name, self.base_model_id)
        run_directory.follow_umask(staging / name)  # the safetensors writer's 0600, mkdtemp's 0700
        run_directory.replace_path(staging / name, out / name, staging)
        shutil.rmtree(staging)

    def _load_optimizer_and_scheduler(self, checkpoint):
        args = self.args
        if checkpoint is None or args.world_size == 1 or args.device.type != "cpu" or args.device.index is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        # several CPU processes: transformers 5.17 maps the optimiser's state to the process's indexed device ('cpu:0'),
        # which torch.load cannot restore; later releases map it to 'cpu', as done here
        import torch
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        self.optimizer.load_state_dict(torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu",
                                                  weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def save_checkpoint_now(self):
        """A checkpoint of the current step (complete or absent, like every other)."""
        self._save_checkpoint(self.model, trial=None)

    # -- logging ---------------------------------------------------------------------------------------------------
    def log(self, logs, *args, **kwargs):
        metrics = self._metrics["train" if self.model.training else "eval"]
        for key, values in list(metrics.items()):
            if values and all(math.isnan(v) for v in values):
                del metrics[key]  # no completion earned this reward in the window: no value, rather than None
        super().log(logs, *args, **kwargs)


# -- configuration from train_grpo.py's settings ------------------------------------------------------------------
def lora_config(settings):
    """PEFT's LoraConfig for train_grpo.py's LORA_* settings (expert LoRA through PEFT's target_parameters, on
    MXFP4-resident experts through expert_lora's wrapper)."""
    from peft import LoraConfig

    import expert_lora

    targets = settings["LORA_TARGETS"]
    return expert_lora.register(LoraConfig(
        r=settings["LORA_RANK"],
        lora_alpha=settings["LORA_ALPHA"],
        lora_dropout=0.0,  # must be 0 for target_parameters (expert LoRA)
        target_modules=targets if targets == "all-linear" else targets.split(","),
        target_parameters=expert_lora.EXPERT_TARGETS if settings["LORA_EXPERTS"] else None,
        task_type="CAUSAL_LM",
    ))


def grpo_config(settings, device, backend):
    """TRL's GRPOConfig for train_grpo.py's settings (a dict of its constants), on `device`, generating with
    `backend`."""
    from trl import GRPOConfig

    from rewards import reward_weights

    checkpointing = {"gradient_checkpointing": settings["GRADIENT_CHECKPOINTING"]}
    if "activation_checkpointing" in {field.name for field in dataclasses.fields(GRPOConfig)}:
        # transformers >= 5.2x renamed it; the old name alone warns (5.17, on the GPU image, has only the old one)
        checkpointing["activation_checkpointing"] = settings["GRADIENT_CHECKPOINTING"]
    out = settings["OUT"]
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(out) / "logs"))  # transformers 5 has no logging_dir
    return GRPOConfig(
        output_dir=out,
        max_steps=settings["TOTAL_STEPS"],
        save_steps=settings["SAVE_STEPS"],
        save_strategy="steps",
        logging_steps=1,
        learning_rate=settings["LEARNING_RATE"],
        # transformers' schedulers: warm-up, then constant or a cosine that ends at MIN_LR_RATIO of the peak
        lr_scheduler_type="cosine_with_min_lr" if settings["LR_SCHEDULE"] == "cosine" else "constant_with_warmup",
        lr_scheduler_kwargs={"min_lr_rate": settings["MIN_LR_RATIO"]} if settings["LR_SCHEDULE"] == "cosine" else {},
        warmup_steps=settings["WARMUP_STEPS"],
        max_grad_norm=settings["MAX_GRAD_NORM"],  # 0: transformers clips nothing
        per_device_train_batch_size=settings["TRAIN_BATCH_SIZE"],
        gradient_accumulation_steps=settings["GRADIENT_ACCUMULATION"],
        steps_per_generation=settings["GRADIENT_ACCUMULATION"],
        num_generations=settings["NUM_GENERATIONS"],
        max_completion_length=settings["MAX_COMPLETION_LEN"],
        temperature=settings["TEMPERATURE"],
        top_p=settings["TOP_P"],
        use_transformers_continuous_batching=backend == "continuous-batching",
        transformers_continuous_batching_config=(continuous_batching_config(settings)
                                                 if backend == "continuous-batching" else None),
        loss_type=settings["LOSS_TYPE"],
        beta=settings["BETA"],
        top_entropy_quantile=settings["TOP_ENTROPY_QUANTILE"],
        reward_weights=reward_weights(),
        shuffle_dataset=False,  # StepStream already orders prompts (no repeats, fair across files)
        **checkpointing,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        report_to=report_trackers(settings["REPORT_TO"]),
        seed=settings["SEED"],
        data_seed=settings["SEED"],
        log_completions=False,  # completions.csv holds them, with the Harmony markers kept
        save_only_model=False,
        dataloader_num_workers=0,
    )


def continuous_batching_config(settings):
    """transformers' continuous batching sized to one step's work instead of a share of free GPU memory.

    Its default takes 90 % of the memory left after loading for the KV cache and lets a prefill batch grow until
    the full-vocabulary logits alone ask for 16 GiB: at real prompt lengths on an 80 GB card that runs out of memory.
    Here: enough 256-token blocks for every completion of a step at the longest prompt, and prefill batches of at
    most 2,048 tokens (1.6 GiB of fp32 logits).
    """
    block = 256
    rows = settings["PROMPTS_PER_STEP"] * settings["NUM_GENERATIONS"]
    blocks_per_row = math.ceil((settings["MAX_PROMPT_LEN"] + settings["MAX_COMPLETION_LEN"]) / block)
    return {"block_size": block, "num_blocks": rows * blocks_per_row + 8, "max_batch_tokens": 2048}


def report_trackers(report_to):
    return [name.strip() for name in report_to.split(",") if name.strip() not in ("", "none")]
