"""Training support around ``transformers.Trainer``: routing statistics and the auxiliary-loss-free bias update.

DeepSeek-V3 balances its experts mainly without a loss: each router adds a per-expert bias to the scores it selects
with (not to the weights it mixes with), and after every optimizer step nudges it by
``gamma * sign(mean_load - load_i)``, so overloaded experts get picked less. The routers count their loads on every
forward (``moe.DeepseekV32TopkRouter.last_load`` / ``accumulated_load``); this module reads and consumes them.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[DeepseekV32BiasUpdateCallback(gamma=1e-3)])
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from .modeling_deepseek_v32 import DeepseekV32PreTrainedModel
from .moe import DeepseekV32TopkRouter

__all__ = [
    "DeepseekV32BiasUpdateCallback",
    "RoutingStats",
    "routers",
    "routing_stats",
    "load_imbalance",
    "reset_routing_loads",
    "update_routing_bias",
    "lora_target_modules",
    "per_expert_lora",
    "get_lora_model",
    "load_lora_adapter",
    "package_architectures",
    "QLORA_SKIP_MODULES",
    "qlora_config",
    "keep_experts_in_graph",
]


def routers(model: nn.Module) -> dict[str, DeepseekV32TopkRouter]:
    """The MoE routers of ``model`` (bare, PEFT- or DDP-wrapped) by module name, MTP layers included."""
    return {name: module for name, module in model.named_modules() if isinstance(module, DeepseekV32TopkRouter)}


def load_imbalance(load: torch.Tensor) -> float:
    """``max(load) / mean(load)``: 1 when every expert gets the same number of tokens, ``E / K`` at worst
    (every token on the same ``K`` experts). NaN for an empty load."""
    load = load.float()
    mean = load.mean()
    return (load.max() / mean).item() if mean > 0 else float("nan")


@dataclass
class RoutingStats:
    """Per-router expert loads (routing slots per expert, float32 ``[E]``), keyed by router module name."""

    loads: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def imbalance(self) -> dict[str, float]:
        """``max / mean`` load per router."""
        return {name: load_imbalance(load) for name, load in self.loads.items()}

    def summary(self, prefix: str = "moe_") -> dict[str, float]:
        """Scalars ready for ``Trainer.log``: mean and max over routers of the max/mean load ratio."""
        values = list(self.imbalance.values())
        if not values:
            return {}
        return {f"{prefix}imbalance_mean": sum(values) / len(values), f"{prefix}imbalance_max": max(values)}


def routing_stats(model: nn.Module, accumulated: bool = False) -> RoutingStats:
    """Expert loads of the last forward (or, with ``accumulated=True``, summed over the training forwards since the
    last bias update). Routers that have not run are left out. Padding tokens (``attention_mask == 0``) are
    routed but not counted."""
    attribute = "accumulated_load" if accumulated else "last_load"
    loads = {}
    for name, router in routers(model).items():
        load = getattr(router, attribute)
        if load is not None:
            loads[name] = load.detach().clone()
    return RoutingStats(loads)


def reset_routing_loads(model: nn.Module) -> None:
    """Forget the loads accumulated since the last bias update (e.g. counted by forwards outside training)."""
    for router in routers(model).values():
        router.accumulated_load = None


@torch.no_grad()
def update_routing_bias(model: nn.Module, gamma: float) -> RoutingStats:
    """One auxiliary-loss-free balancing step: ``bias_i += gamma * sign(mean_load - load_i)`` per router, with the
    loads accumulated since the previous call (all micro-batches of a gradient-accumulation step), which it then
    resets. Under ``torch.distributed`` the loads are summed over ranks first so every rank applies the same update.
    Returns the loads it used."""
    used = {}
    distributed = dist.is_available() and dist.is_initialized()
    for name, router in routers(model).items():
        load = router.accumulated_load
        router.accumulated_load = None
        bias = router.e_score_correction_bias
        if bias is None:
            continue
        if distributed:
            # Every rank must take part, also one whose batch happened not to reach this router (MTP layer off).
            load = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if load is None else load
            load = load.to(bias.device)
            dist.all_reduce(load)
            if not load.any():
                continue
        elif load is None:
            continue
        load = load.to(bias.device)
        bias.add_(gamma * torch.sign(load.mean() - load))
        used[name] = load
    return RoutingStats(used)


class DeepseekV32BiasUpdateCallback(TrainerCallback):
    """``TrainerCallback`` for DeepSeek-V3's auxiliary-loss-free load balancing.

    After every optimizer step it moves each router's ``e_score_correction_bias`` by
    ``gamma * sign(mean_load - load_i)``, using the expert loads of all training forwards since the previous step (so
    all micro-batches of a gradient-accumulation step count). ``history`` keeps ``(global_step, summary)`` for each
    update, ``summary`` being ``RoutingStats.summary()`` of the loads it used; log it with ``trainer.log`` if wanted.

    Args:
        gamma: bias update speed. DeepSeek-V3 used 1e-3 for most of pre-training and 0 at the end.
    """

    def __init__(self, gamma: float = 1e-3):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.history: list[tuple[int, dict[str, float]]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            reset_routing_loads(model)  # forwards before training (evaluation, probes) must not count

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            used = update_routing_bias(model, self.gamma)
            # `global_step` is incremented after this event, so the step that just ran is global_step + 1.
            self.history.append((state.global_step + 1, used.summary()))


def keep_experts_in_graph(model: nn.Module) -> list:
    """Give every routed expert a (zero) gradient in every training step, for FSDP2 and DDP without
    ``find_unused_parameters``.

    An expert that receives no token in a step is not in the autograd graph, so its parameters get no gradient on
    that rank. FSDP2 reduce-scatters a layer's gradients as one flat buffer, so ranks that disagree on which
    parameters have gradients send buffers of different sizes and the collective fails or hangs. This adds
    ``0 * w[0]`` for the first element of each trainable expert parameter to each MoE block's output in training
    mode: the numbers are unchanged and every expert parameter gets a (zero) gradient. Returns the hook handles.
    """
    from .moe import DeepseekV32MoE

    def hook(module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return output
        firsts = [param.reshape(-1)[:1] for param in module.experts.parameters() if param.requires_grad]
        if not firsts:
            return output
        return output + torch.cat(firsts).sum().to(output.dtype) * 0

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DeepseekV32MoE)]


_ATTENTION_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def lora_target_modules(
    attention: bool = True, experts: bool = True, shared_experts: bool = True, dense_mlp: bool = False
) -> str:
    """A regular expression for ``peft.LoraConfig(target_modules=...)`` picking DeepSeek-V3.2's projections by role.

    ``attention``: the MLA projections (the indexer's ``wq_b``/``wk`` are left alone: the indexer has its own loss).
    ``experts``: every routed expert's ``gate_proj``/``up_proj``/``down_proj`` (``mlp.experts.E.*``, plain
    ``nn.Linear`` modules). ``shared_experts`` and ``dense_mlp`` (the first ``first_k_dense_replace`` layers) likewise.
    The router (``mlp.gate``) is never a target. MTP layers share the names and are included.
    """
    alternatives = []
    projections = "|".join(_MLP_PROJECTIONS)
    if attention:
        alternatives.append(rf"self_attn\.(?:{'|'.join(_ATTENTION_PROJECTIONS)})")
    if experts:
        alternatives.append(rf"mlp\.experts\.\d+\.(?:{projections})")
    if shared_experts:
        alternatives.append(rf"mlp\.shared_experts\.(?:{projections})")
    if dense_mlp:
        alternatives.append(rf"mlp\.(?:{projections})")
    if not alternatives:
        raise ValueError("choose at least one group of modules")
    return rf".*\.layers\.\d+\.(?:{'|'.join(alternatives)})"


@contextlib.contextmanager
def per_expert_lora():
    """Let PEFT target this package's per-expert ``nn.Linear`` modules.

    PEFT >= 0.18 rewrites a LoRA config for any model whose ``model_type`` has a transformers v5 weight conversion:
    for ``deepseek_v32`` it assumes transformers' native fused experts and moves ``gate_proj``/``up_proj``/
    ``down_proj`` from ``target_modules`` to ``target_parameters=["gate_up_proj", "down_proj"]``, which match nothing
    here, so the experts silently get no adapters. (transformers itself skips its conversions for custom-code models;
    PEFT does not ask.) Inside this context that rewrite is skipped for DeepSeek-V3.2 models of this package only.
    """
    from peft.utils import transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers

    def convert(peft_config, model, conversions):
        if isinstance(model, DeepseekV32PreTrainedModel):
            return None
        return original(peft_config, model=model, conversions=conversions)

    conversion.convert_peft_config_for_transformers = convert
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


@contextlib.contextmanager
def package_architectures():
    """Make ``getattr(transformers, "DeepseekV32ForCausalLM")`` (and ``DeepseekV32Model``) return this package's
    classes for the duration of the context.

    TRL (``trl.trainer.utils.create_model_from_path``) builds models from a path by looking the name in
    ``config.architectures`` up in the ``transformers`` namespace, not through ``AutoModelForCausalLM``. For a
    DeepSeek-V3.2 checkpoint that finds transformers' *native* implementation (different MoE, indexer and cache, no
    MTP), which loads the same tensor names without complaint. ``GRPOTrainer`` always builds its reference model this
    way (and ``SFTTrainer``/``GRPOTrainer`` a policy given as a path), so without this context the KL penalty compares
    against another model. Construct TRL trainers inside it::

        with package_architectures():
            trainer = GRPOTrainer(model=path, ...)
    """
    import transformers

    from .modeling_deepseek_v32 import DeepseekV32ForCausalLM, DeepseekV32Model

    ours = {"DeepseekV32ForCausalLM": DeepseekV32ForCausalLM, "DeepseekV32Model": DeepseekV32Model}
    namespace = vars(transformers)
    # The lazy module resolves names on first access and caches them in its __dict__: remember what was there.
    saved = {name: namespace[name] for name in ours if name in namespace}
    for name, cls in ours.items():
        setattr(transformers, name, cls)
    try:
        yield
    finally:
        for name in ours:
            if name in saved:
                setattr(transformers, name, saved[name])
            else:
                delattr(transformers, name)


# Linears whose weight the model reads directly instead of calling the module, so a packed 4-bit weight would break
# them: `kv_b_proj` (the absorbed decode path and the sparse MLA kernel take W_UK/W_UV from its matrix) and the
# indexer's `weights_proj` (an fp32 F.linear on its weight). Both are small; the routed experts, which hold almost
# all parameters, are quantized. The output head stays unquantized as usual.
QLORA_SKIP_MODULES = ["lm_head", "kv_b_proj", "weights_proj"]


def qlora_config(**overrides):
    """``transformers.BitsAndBytesConfig`` for QLoRA on DeepSeek-V3.2: NF4 with double quantization, bf16 compute,
    and :data:`QLORA_SKIP_MODULES` left unquantized. Keyword arguments override any field."""
    from transformers import BitsAndBytesConfig

    fields = dict(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=list(QLORA_SKIP_MODULES),
    )  # fmt: skip
    return BitsAndBytesConfig(**{**fields, **overrides})


def get_lora_model(model: nn.Module, lora_config, **kwargs):
    """``peft.get_peft_model`` inside :func:`per_expert_lora`, so expert projections named by ``lora_config`` (e.g.
    through :func:`lora_target_modules`) really get adapters."""
    import peft

    with per_expert_lora():
        return peft.get_peft_model(model, lora_config, **kwargs)


def load_lora_adapter(model: nn.Module, adapter_path: str, **kwargs):
    """``peft.PeftModel.from_pretrained`` inside :func:`per_expert_lora` (reloads adapters on expert projections)."""
    import peft

    with per_expert_lora():
        return peft.PeftModel.from_pretrained(model, adapter_path, **kwargs)
