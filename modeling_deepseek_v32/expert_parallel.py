"""Expert parallelism for the routed experts under ``from_pretrained(..., tp_plan="auto")``.

With ``W`` tensor-parallel ranks, rank ``r`` keeps routed experts ``[r*E/W, (r+1)*E/W)`` of every MoE layer; the
other entries of ``mlp.experts`` become ``None`` before the weights load, so their tensors are neither allocated nor
read (their checkpoint keys are skipped, and ``DeepseekV32PreTrainedModel`` keeps them out of the unexpected-key
report). Routing stays replicated: every rank runs the same gate, bias included, on the same tokens, so all ranks
agree on every (token, slot) assignment without communication. Each rank runs only the slots routed to its own
experts and the fp32 partial sums are all-reduced; the shared experts (colwise/rowwise, their own all-reduce) are
added afterwards by ``DeepseekV32MoE``, once.

transformers' own expert-parallel styles shard fused 3-D expert tensors; experts here are one ``DeepseekV32MLP`` per
expert (official per-expert checkpoint names, FP8/bitsandbytes/PEFT wrap each linear), so the split is a plan style
of our own, registered with transformers' ``ParallelInterface`` under :data:`STYLE` and named for
``layers.*.mlp.experts`` in ``DeepseekV32Config.base_model_tp_plan``. transformers applies it after building the
model on the meta device and before loading (5.17 and 5.23 alike).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

STYLE = "deepseek_v32_local_experts"
_SHARD_ATTRIBUTE = "expert_shard"


class _LocalExperts:
    """This rank's experts as the object ``kernels.grouped_moe`` reads (``.experts``; it caches its pointer tables
    here). Expert ``start + i`` of the model's list is entry ``i``."""

    def __init__(self, modules: list[nn.Module]):
        self.experts = nn.ModuleList(modules)


@dataclass
class ExpertShard:
    """Which routed experts this rank holds and the process group the partial sums are added over."""

    rank: int
    size: int
    start: int
    stop: int
    group: object  # torch.distributed ProcessGroup; None only in single-process tests of the routing math
    local: _LocalExperts

    def owns(self, index: int) -> bool:
        return self.start <= index < self.stop

    def local_experts(self, experts: nn.ModuleList) -> _LocalExperts:
        """The holder, rebuilt if an expert module object in the model's list was swapped since sharding."""
        # The dict's values, not experts[i]: indexing a ModuleList costs ~4 us, ~30 ms per forward of the 671B model.
        current = list(experts._modules.values())[self.start : self.stop]
        if any(a is not b for a, b in zip(current, self.local.experts)):
            self.local = _LocalExperts(current)
        return self.local

    def select(
        self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (token, slot) pairs routed to this rank's experts, as a one-slot routing over gathered rows:
        ``(token_of_slot [n], rows [n, hidden], weights [n, 1], local expert ids [n, 1])``.

        The boolean selection costs one host sync (the count of local slots); the grouped kernel without expert
        parallelism has none, so a CUDA graph cannot hold this step."""
        if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
            # Raised before the sync would invalidate the capture; the static cache then decodes eagerly.
            raise RuntimeError("expert-parallel MoE counts its slots on the host and cannot be captured in a CUDA graph")
        if torch.is_grad_enabled():
            # Each rank's expert path gives the gradient of only its own slots: sum them over the ranks (the gate
            # then sees the full gradient on every rank, as its replicated computation expects).
            if tokens.requires_grad:
                tokens = _SumGradsOverRanks.apply(tokens, self.group)
            if weights.requires_grad:
                weights = _SumGradsOverRanks.apply(weights, self.group)
        mine = (experts >= self.start) & (experts < self.stop)
        slots = mine.flatten().nonzero().squeeze(1)
        token_of_slot = torch.div(slots, experts.shape[1], rounding_mode="floor")
        local_ids = experts.flatten().index_select(0, slots) - self.start
        rows = tokens.index_select(0, token_of_slot)
        return token_of_slot, rows, weights.flatten().index_select(0, slots)[:, None], local_ids[:, None]

    def combine(self, partial: torch.Tensor, token_of_slot: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """This rank's weighted slot outputs ``[n, hidden]`` fp32 summed per token: ``[n_tokens, hidden]``, still a
        partial sum (:meth:`sum_over_ranks` completes it)."""
        out = torch.zeros(n_tokens, partial.shape[-1], dtype=torch.float32, device=partial.device)
        return out.index_add(0, token_of_slot, partial.float())

    def sum_over_ranks(self, partial: torch.Tensor) -> torch.Tensor:
        if self.group is None or self.size == 1:
            return partial
        return _SumOverRanks.apply(partial, self.group)


def expert_shard(experts: nn.Module) -> ExpertShard | None:
    """The shard of a MoE layer's ``experts`` list, or None when it holds every expert."""
    return getattr(experts, _SHARD_ATTRIBUTE, None)


def shard_experts(experts: nn.ModuleList, rank: int, size: int, group=None) -> ExpertShard:
    """Keep experts ``[rank*E/size, (rank+1)*E/size)`` of ``experts``, drop the others (entries become None: no
    module, no parameters, no state-dict keys) and mark the list so ``DeepseekV32MoE`` runs the EP path."""
    if expert_shard(experts) is not None:
        raise ValueError("these experts are already split over ranks")
    total = len(experts)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} of {size} is not a valid expert-parallel position")
    if total % size:
        raise ValueError(
            f"expert parallelism needs n_routed_experts ({total}) divisible by the tensor-parallel world size "
            f"({size}); use a world size that divides it, or pass a tp_plan without the "
            f"'layers.*.mlp.experts' entry to keep the routed experts replicated"
        )
    per_rank = total // size
    start, stop = rank * per_rank, (rank + 1) * per_rank
    local = [experts[i] for i in range(start, stop)]
    for index in range(total):
        if not start <= index < stop:
            experts._modules[str(index)] = None
    shard = ExpertShard(rank, size, start, stop, group, _LocalExperts(local))
    setattr(experts, _SHARD_ATTRIBUTE, shard)
    return shard


def has_expert_shards(model: nn.Module) -> bool:
    return any(expert_shard(module) is not None for module in model.modules())


_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.")


def without_other_ranks_experts(model: nn.Module, keys: set[str]) -> set[str]:
    """``keys`` less those of experts another rank holds: checkpoint tensors this rank skipped on purpose."""
    sharded = {name: shard for name, module in model.named_modules() if (shard := expert_shard(module)) is not None}
    if not sharded:
        return keys

    def skipped(key: str) -> bool:
        match = _EXPERT_KEY.match(key)
        shard = match and sharded.get(match.group(1))
        return bool(shard) and not shard.owns(int(match.group(2)))

    return {key for key in keys if not skipped(key)}


if torch.distributed.is_available():
    import torch.distributed as dist

    class _SumOverRanks(torch.autograd.Function):
        """All-reduce (sum) forward; identity backward, since every rank receives the same (replicated) gradient
        for the summed output and each partial contributed with coefficient one."""

        @staticmethod
        def forward(ctx, partial, group):
            total = partial.clone()
            dist.all_reduce(total, group=group)
            return total

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    class _SumGradsOverRanks(torch.autograd.Function):
        """Identity forward; all-reduce (sum) of the gradient in backward."""

        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            if ctx.group is None:
                return grad, None
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=ctx.group)
            return grad, None

    def _mesh_group(mesh):
        return mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")

    try:  # the style registry moved between transformers releases; both expose it here
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, TensorParallelLayer
    except ImportError:  # pragma: no cover - a transformers without the DTensor tensor-parallel backend
        ALL_PARALLEL_STYLES = TensorParallelLayer = None

    if TensorParallelLayer is not None:

        class LocalExpertsParallel(TensorParallelLayer):
            """Plan style for a MoE layer's ``experts`` ``nn.ModuleList``: keep this rank's experts, drop the rest.

            transformers calls ``install_forward`` on the module a plan entry names, after building the model on the
            meta device and before loading weights; the list's own forward is never called, so nothing is wrapped.
            """

            def install_forward(self, module, mesh):
                if not isinstance(module, nn.ModuleList):
                    raise ValueError(
                        f"the {STYLE!r} style splits a MoE layer's `experts` ModuleList, got {type(module).__name__}"
                    )
                shard_experts(module, mesh.get_local_rank(), mesh.size(), _mesh_group(mesh))
                return module

        ALL_PARALLEL_STYLES.register(STYLE, LocalExpertsParallel())
else:  # pragma: no cover - torch built without distributed

    def _unavailable(*args, **kwargs):
        raise RuntimeError("expert parallelism needs torch.distributed")

    class _SumOverRanks:
        apply = staticmethod(_unavailable)

    class _SumGradsOverRanks:
        apply = staticmethod(_unavailable)
