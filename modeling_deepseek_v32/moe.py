"""DeepSeekMoE: group-limited routing over fine-grained experts plus always-on shared experts.

Experts stay one ``DeepseekV32MLP`` each, so the checkpoint names are the official per-expert ones and every expert
weight is a plain linear that FP8, bitsandbytes and PEFT can each wrap. Tokens are sorted by expert and each expert
runs once on its contiguous slice; the Python loop is over experts that received tokens, never over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels as _kernels
from .configuration import DeepseekV32Config
from .expert_parallel import expert_shard
from .layers import DeepseekV32MLP
from .moe_balancing import expert_load, in_checkpoint_recompute, sequence_balance_loss


class DeepseekV32TopkRouter(nn.Module):
    """The gate: fp32 scores, optional bias for selection only, group-limited top-k, renormalized weights."""

    def __init__(self, config: DeepseekV32Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            # Updated outside backprop (auxiliary-loss-free balancing), so a buffer kept in fp32.
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Routing statistics (plain attributes, not state): slots per expert of real (non-padding) tokens in the last
        # forward, and summed over training forwards until the bias update (training.DeepseekV32BiasUpdateCallback)
        # consumes them.
        self.last_load: torch.Tensor | None = None
        self.accumulated_load: torch.Tensor | None = None

    def forward(
        self, hidden_states: torch.Tensor, token_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden_states``: [tokens, hidden]; ``token_valid``: optional bool [tokens], False for padding, which is
        routed but left out of the expert loads.

        Returns (router_logits, weights [tokens, k] fp32, experts [tokens, k])."""
        # fp32 routing as DeepSeek's runtime does, also under bf16 autocast (which would run this linear in bf16).
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            logits = F.linear(hidden_states.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        selection = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.n_group > 1:
            selection = self._keep_best_groups(selection)
        experts = selection.topk(self.top_k, dim=-1, sorted=False).indices
        if not in_checkpoint_recompute():
            self.last_load = expert_load(experts, self.n_routed_experts, token_valid)
            if self.training:
                previous = self.accumulated_load
                self.accumulated_load = self.last_load if previous is None else previous + self.last_load
        weights = scores.gather(1, experts)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * self.routed_scaling_factor, experts

    def _keep_best_groups(self, selection: torch.Tensor) -> torch.Tensor:
        grouped = selection.view(selection.shape[0], self.n_group, -1)
        if self.e_score_correction_bias is None:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        kept = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)


class DeepseekV32MoE(nn.Module):
    """Routed experts weighted by the gate, plus shared experts applied to every token."""

    def __init__(self, config: DeepseekV32Config):
        super().__init__()
        # Read live, so changing `moe_aux_loss_alpha` on a built model takes effect.
        self.config = config
        # DeepSeek-V3's sequence-wise balance loss of the last training forward (without alpha); the causal LM
        # collects it into `aux_loss`.
        self.balance_loss: torch.Tensor | None = None
        self.gate = DeepseekV32TopkRouter(config)
        self.experts = nn.ModuleList(
            DeepseekV32MLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = (
            DeepseekV32MLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, hidden_states: torch.Tensor, token_valid: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states`` [..., hidden]; ``token_valid`` bool of the leading shape (False: padding, kept out of the
        routing statistics and the balance loss)."""
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        flat_valid = None if token_valid is None else token_valid.reshape(-1).to(tokens.device)
        logits, weights, experts = self.gate(tokens, flat_valid)
        if self.training and self.config.moe_aux_loss_alpha > 0:
            scores = logits.sigmoid() if self.gate.scoring_func == "sigmoid" else logits.softmax(dim=-1)
            sequences = shape[0] if len(shape) == 3 else 1
            balance_loss = sequence_balance_loss(
                scores.view(sequences, -1, scores.shape[-1]),
                experts.view(sequences, -1, experts.shape[-1]),
                None if flat_valid is None else flat_valid.view(sequences, -1),
            )
            # A checkpoint recomputation must save the same tensors as the first forward, so it computes the loss
            # too, but only the first forward's value (already collected) is kept.
            if not in_checkpoint_recompute():
                self.balance_loss = balance_loss
        routed = self.run_experts(tokens, weights, experts)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(tokens).float()
        return routed.to(hidden_states.dtype).view(shape)

    def run_experts(self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Sum of ``weights[t, j] * expert_{experts[t, j]}(tokens[t])`` accumulated in fp32.

        On CUDA the grouped Triton kernel computes it without a host sync (``kernels.grouped_moe``); the per-expert
        loop (:func:`expert_loop`) is its twin, and runs for anything the kernel cannot read (quantized or
        PEFT-wrapped experts, training). Under expert parallelism (``expert_parallel.py``) this rank runs, through
        the same kernel or loop, only the slots routed to its own experts, and the partial sums are all-reduced."""
        shard = expert_shard(self.experts)
        if shard is not None:
            token_of_slot, rows, slot_weights, local_ids = shard.select(tokens, weights, experts)
            partial = _routed_sum(shard.local_experts(self.experts), rows, slot_weights, local_ids)
            return shard.sum_over_ranks(shard.combine(partial, token_of_slot, tokens.shape[0]))
        return _routed_sum(self, tokens, weights, experts)


def _routed_sum(owner, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``owner.experts`` (a MoE module's, or this rank's under expert parallelism) through the kernel or the loop."""
    grouped = _kernels.grouped_moe(owner, tokens, weights, experts)
    if grouped is not None:
        return grouped
    return expert_loop(owner.experts, tokens, weights, experts)


def expert_loop(modules, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Tokens sorted by expert, each of ``modules`` run once on its contiguous slice (a loop over experts that
    received tokens, never over tokens); ``experts`` index ``modules``."""
    flat_experts = experts.flatten()
    order = flat_experts.argsort(stable=True)
    token_of_slot = order // experts.shape[1]
    counts = torch.bincount(flat_experts, minlength=len(modules)).tolist()
    sorted_inputs = tokens.index_select(0, token_of_slot)
    sorted_weights = weights.flatten().index_select(0, order)
    output = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    start = 0
    for expert_idx, count in enumerate(counts):
        if count == 0:
            continue
        stop = start + count
        expert_out = modules[expert_idx](sorted_inputs[start:stop]).float()
        output.index_add_(0, token_of_slot[start:stop], expert_out * sorted_weights[start:stop, None])
        start = stop
    return output
