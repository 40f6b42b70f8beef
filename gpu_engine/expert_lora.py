"""LoRA on gpt-oss' experts: PEFT's layout of the factors, and its wrapper for MXFP4-resident experts.

    config = expert_lora.register(LoraConfig(..., target_parameters=EXPERT_TARGETS))  # before get_peft_model
    model = expert_lora.load_adapter(model, adapter_dir)  # instead of PeftModel.from_pretrained

PEFT adapts transformers' GptOssExperts through `target_parameters`: one ParamWrapper per targeted weight, the two
nested, each holding lora_A [E * r, in] and lora_B [out, r * E]; its forward folds W + scale * A B into a copy of
the weight. MXFP4-resident experts (mxfp4_experts.Mxfp4Experts) have no bf16 weight to fold into, so `ParamWrapper`
below, PEFT's wrapper with the same tensors and names, hands the factors to the experts instead, which add them as
low-rank terms (x A_e) B_e: nothing of the experts' size is built, in training, in evaluation and in the rollout
engine. An adapter trained on either format is the same file and loads on both.

Its ParamWrapper subclasses PEFT's and so relies on PEFT internals: this file is their one owner, and each is listed
in library_internals.EXPERT_LORA and checked whenever a LoRA config is registered.
"""

from peft import PeftConfig, PeftModel
from peft.tuners.lora.layer import ParamWrapper as PeftParamWrapper

import library_internals
from gpu_engine.mxfp4_experts import Mxfp4Experts

# -----------------------------------------------------------------------------
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # LoraConfig.target_parameters of an
                                                                        #   expert LoRA (LORA_EXPERTS)
# -----------------------------------------------------------------------------


def expert_lora_factors(module):
    """{parameter name: (A [E, in, r], B [E, r, out], scale)} of the active expert LoRA on `module` (a GptOssExperts
    or Mxfp4Experts, wrapped by PEFT), or None. Views of the adapter's own tensors: gradients reach them.

    PEFT's ParamWrapper (one per targeted parameter, nested) stores lora_A as [E * r, in] and lora_B as
    [out, r * E] for a parameter laid out [E, in, out], as gpt-oss's experts are.
    """
    factors = {}  # empty -> None at the end: no live expert LoRA
    while hasattr(module, "parameter_name") and hasattr(module, "lora_A"):
        if not module.disable_adapters and not module.merged:
            for name in module.active_adapters:
                if name in module.lora_A:
                    if module.parameter_name in factors:
                        raise NotImplementedError(f"two active adapters adapt the experts' {module.parameter_name}; "
                                                  "the low-rank path runs one: set_adapter() to one of them")
                    if getattr(module, "_did_swap_in_out_features", False):
                        raise NotImplementedError("expert LoRA on [E, out, in] parameters is not supported")
                    count = module.num_experts
                    a = module.lora_A[name].weight
                    b = module.lora_B[name].weight
                    a = a.reshape(count, -1, a.shape[-1]).transpose(1, 2)  # [E, in, r]
                    b = b.reshape(b.shape[0], -1, count).permute(2, 1, 0)  # [E, r, out]
                    factors[module.parameter_name] = (a, b, module.scaling[name])
        module = module.base_layer
    return factors or None


class ParamWrapper(PeftParamWrapper):
    """PEFT's expert LoRA wrapper on Mxfp4Experts: PEFT's tensors, names and switches (disable_adapter, set_adapter),
    with the forward passing the low-rank factors of this wrapper and the one nested in it to the experts.

    It keeps PEFT's class name because PEFT nests the wrapper of a module's second parameter around the first only
    when the first one's class is called ParamWrapper (peft.tuners.tuners_utils, _inject_parameters).
    """

    def _get_in_out_features(self, module):
        # PEFT reads these from the wrapped parameter's shape; Mxfp4Experts' are empty stand-ins
        experts = self.get_base_layer()
        self.num_experts, self._param_ndim = experts.num_experts, 3
        hidden, intermediate = experts.hidden_size, experts.intermediate_size
        return {"gate_up_proj": (hidden, 2 * intermediate), "down_proj": (intermediate, hidden)}[self.parameter_name]

    def forward(self, x, *args, **kwargs):
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("an expert LoRA on MXFP4 experts runs one adapter for the whole batch (no adapter_names)")
        return self.get_base_layer()(x, *args, factors=expert_lora_factors(self), **kwargs)

    def merge(self, safe_merge=False, adapter_names=None):
        # PEFT merges layer by layer: the attention layers before this one are merged by now (unmerge_adapter()
        # undoes that), and the experts stay as they are
        raise ValueError("an expert LoRA cannot be merged into MXFP4-resident experts (their bytes would be rounded; "
                         "layers merged before them stay merged until unmerge_adapter()): load the model with "
                         "--experts-format bf16 to merge it, or export it with export_quantized_model.py, which says "
                         "what the rounding keeps")


def register(config):
    """`config` (a PEFT config) with Mxfp4Experts' wrapper registered, so that get_peft_model and
    PeftModel.from_pretrained put `ParamWrapper` on MXFP4-resident experts (bf16 experts keep PEFT's own)."""
    library_internals.check(library_internals.EXPERT_LORA)
    if hasattr(config, "_register_custom_module"):  # LoRA configs; other adapter types never target experts here
        config._register_custom_module({Mxfp4Experts: ParamWrapper})
    return config


def load_adapter(model, adapter_dir, **kwargs):
    """PeftModel.from_pretrained(model, adapter_dir, **kwargs) for a base whose experts may be MXFP4-resident."""
    config = register(PeftConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config, **kwargs)
