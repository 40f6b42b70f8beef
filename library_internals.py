"""Every private TRL / transformers / PEFT name this project relies on, in one list, and the check that they exist.

    library_internals.check(library_internals.TRAINER)    # training/grpo_trainer.py: TesGRPOTrainer, when it is built
    library_internals.check(library_internals.ENGINE)     # gpu_engine/rollout_engine.py: RolloutEngine, when built
    library_internals.check(library_internals.EXPERT_LORA)  # gpu_engine/expert_lora.py: register, every LoRA config
    library_internals.check(library_internals.ATTENTION)  # gpu_engine/sink_attention.py: before a model is loaded

A release that renames or changes one of them would otherwise change this project's behaviour silently (a CPU
scoring path no longer taken, a checkpoint written half). The check stops with one message naming the internal,
the installed versions and the tested ones. Two kinds of entry:
- (module, dotted attribute, parameters): a function or method that must exist and take those parameters (no
  parameters: a module constant that must exist);
- (module, None, name): an instance attribute, which must still appear in the module's source (it is set on
  objects the module builds, so only the source can be asked before one exists).
"""

import importlib
import inspect
from importlib.metadata import version

# -----------------------------------------------------------------------------
TESTED_VERSIONS = "trl 1.16, transformers 5.17 and 5.24, peft 0.21"  # where these were read and the tests pass
TRAINER = (  # grpo_trainer.TesGRPOTrainer overrides or calls these
    ("trl", "GRPOTrainer._get_per_token_logps_and_entropies",
     ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy", "compute_aux_loss")),
    ("trl", "GRPOTrainer._generate", ("prompts",)),
    ("trl", "GRPOTrainer._calculate_rewards", ("inputs", "prompts", "completions", "completion_ids_list")),
    ("trl.trainer.grpo_trainer", None, "return prompt_ids, completion_ids,"),  # _generate's result: [1] is the ids
    ("trl", "GRPOTrainer._log_metric", ("name", "value")),
    ("transformers", "Trainer._save_checkpoint", ("model", "trial")),
    ("transformers", "Trainer._get_output_dir", ("trial",)),
    ("transformers", "Trainer._load_optimizer_and_scheduler", ("checkpoint",)),
    ("transformers.trainer", "OPTIMIZER_NAME", ()),  # the checkpoint's file names, read on a CPU resume
    ("transformers.trainer", "SCHEDULER_NAME", ()),
    ("trl.trainer.utils", "selective_log_softmax_and_entropy", ("logits", "index", "temperature")),
    ("trl.trainer.grpo_trainer", None, "_metrics"),  # {"train" | "eval": {metric: [values]}}, read by its `log`
    # packed_scoring, which the scoring override calls: TRL's fused LM head scores pre-shifted labels, and its MoE loss
    # reads the 2-D attention mask as given (the packed rows' token weights)
    ("trl.trainer.utils", None, "hidden_states = backbone_outputs.last_hidden_state\n            labels = shift_labels"),
    ("trl.trainer.utils", None, 'num_experts_per_tok, kwargs.get("attention_mask")'),
)
EXPERT_LORA = (  # gpu_engine/expert_lora.py's wrapper for MXFP4-resident experts subclasses PEFT's ParamWrapper
    ("peft.tuners.lora.config", "LoraConfig._register_custom_module", ("mapping",)),
    ("peft.tuners.lora.layer", "ParamWrapper._get_in_out_features", ("module",)),
    ("peft.tuners.lora.layer", "ParamWrapper._check_forward_args", ("x",)),
    ("peft.tuners.lora.layer", None, "_param_ndim"),  # set by _get_in_out_features, read by update_layer
    ("peft.tuners.tuners_utils", None, '!= "ParamWrapper"'),  # nesting of two wrappers decided by class name
    ("peft.tuners.lora.model", None, "target_base_layer = target.get_base_layer()"),  # a registered class is
                                                                                      #   matched by the base layer
    ("peft.tuners.lora.layer", None, "_did_swap_in_out_features"),  # read by expert_lora_factors
)
ENGINE = (  # gpu_engine/rollout_engine.py and decode_step.py read these (and expert_lora_factors, which they call)
    ("transformers.configuration_utils", None, "_experts_implementation"),  # which experts kernel a model runs
    ("transformers.configuration_utils", None, "_attn_implementation"),  # which attention the prefill matches
    ("peft.tuners.lora.layer", None, "_did_swap_in_out_features"),  # ParamWrapper's expert LoRA orientation
)
ATTENTION = (  # sink_attention.register: gpt-oss attention with sinks through SDPA, registered with transformers
    ("transformers.masking_utils", "AttentionMaskInterface.register", ("key", "value")),
    ("transformers.masking_utils", "sdpa_mask", ("allow_is_causal_skip",)),  # materialised: the sink needs a column
    ("transformers.models.gpt_oss.modeling_gpt_oss", None, "s_aux=self.sinks"),  # the sinks reach the interface
    ("transformers.configuration_utils", None, "_attn_implementation"),  # attends_through_this: packed rows need NAME
)
OWNERS = {  # the one file that may use each group's names (tests/test_layout.py checks that no other file does)
    "training/grpo_trainer.py": TRAINER,
    "gpu_engine/expert_lora.py": EXPERT_LORA,  # its ParamWrapper subclasses PEFT's: an owner of PEFT's internals
    "gpu_engine/rollout_engine.py": ENGINE,
    "gpu_engine/sink_attention.py": ATTENTION,
}
# -----------------------------------------------------------------------------


class LibraryMismatch(RuntimeError):
    """An internal this project relies on is missing or changed in the installed libraries."""


def installed_versions():
    return ", ".join(f"{name} {version(name)}" for name in ("trl", "transformers", "peft"))


def find(module_name, path):
    """The object at `module.path` (dotted), or None."""
    obj = importlib.import_module(module_name)
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def problem_with(module_name, path, expected):
    """What is wrong with one entry, or None."""
    if path is None:
        return None if expected in inspect.getsource(importlib.import_module(module_name)) else "is never set"
    obj = find(module_name, path)
    if obj is None:
        return "is missing"
    if not expected:  # a constant: it must exist
        return None
    missing = [p for p in expected if p not in inspect.signature(obj).parameters]
    return f"no longer takes {', '.join(missing)}" if missing else None


def check(internals):
    """LibraryMismatch naming the first entry that is missing or changed."""
    for module_name, path, expected in internals:
        problem = problem_with(module_name, path, expected)
        if problem:
            name = f"{module_name}.{path}" if path else f"{module_name}: the attribute {expected}"
            raise LibraryMismatch(f"{name} {problem}: this project relies on it (library_internals.py). Installed: "
                                  f"{installed_versions()}; tested: {TESTED_VERSIONS}. Install the versions in "
                                  "requirements.txt (pip install -r requirements.txt)")
