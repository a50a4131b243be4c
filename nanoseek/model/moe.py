"""DeepSeekMoE: gate (sigmoid/softmax, selection bias, group-limited top-k), fused routed experts, shared experts.

Shape legend: N = tokens (B*T flattened), D = hidden, E = routed experts, K = experts per token,
I = expert width, G = expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP


@dataclass
class RouterOutput:
    """What training and RL need from one MoE layer. `load` and `balance_loss` are computed on first
    access, so inference (which never reads them) does not pay for them."""

    expert_ids: torch.Tensor  # (B, T, K) long: chosen experts
    weights: torch.Tensor  # (B, T, K) fp32: combine weights (normalised, scaled)
    scores: torch.Tensor  # (B, T, E) fp32: affinities s (sigmoid or softmax), before the selection bias

    @cached_property
    def load(self) -> torch.Tensor:
        """(E,) fp32: tokens routed to each expert in this forward."""
        E = self.scores.shape[-1]
        ids = self.expert_ids.reshape(-1).detach()
        return torch.zeros(E, device=ids.device).index_add_(0, ids, torch.ones(ids.numel(), device=ids.device))

    @cached_property
    def balance_loss(self) -> torch.Tensor:
        """Sequence-wise balance loss (V3 eq. 17-20), mean over sequences, not yet times alpha:
        sum_i f_i P_i with f_i = E/(K T) * count_i and P_i = mean_t of s normalised over the experts."""
        B, T, K = self.expert_ids.shape
        E = self.scores.shape[-1]
        counts = torch.zeros(B, E, device=self.scores.device).scatter_add_(
            1, self.expert_ids.reshape(B, T * K), torch.ones(B, T * K, device=self.scores.device))
        P = (self.scores / self.scores.sum(-1, keepdim=True)).mean(1)
        return (counts * (E / (K * T)) * P).sum(-1).mean()


class Gate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.E, self.K = config.n_routed_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.E, config.hidden_size))
        if config.topk_method == "noaux_tc":
            # added to the scores for SELECTION only (aux-loss-free balancing); kept in fp32 whatever the model dtype
            self.register_buffer("e_score_correction_bias", torch.zeros(self.E, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        b = self.e_score_correction_bias
        if b is not None and b.dtype != torch.float32 and not b.is_meta:
            self.e_score_correction_bias = b.float()
        return self

    def forward(self, x: torch.Tensor, forced_ids: torch.Tensor | None = None):
        """x: (N, D). Returns ids (N, K), weights (N, K) fp32, scores (N, E) fp32."""
        logits = F.linear(x.float(), self.weight.float())  # gate in fp32
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        if forced_ids is not None:  # keep routing (V3.2 RL): replay the sampler's choice; -1 = route freely
            ids = forced_ids.long()
            if bool((ids < 0).any()):
                ids = torch.where(ids >= 0, ids, self.select(scores))
        else:
            ids = self.select(scores)
        w = scores.gather(1, ids)
        if self.norm_topk_prob:  # every K, as DeepSeek's Gate and transformers' router (K = 1: w = s/s = 1)
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, w * self.scale, scores

    @torch.no_grad()
    def select(self, scores: torch.Tensor) -> torch.Tensor:
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1:
            N = choice.shape[0]
            grouped = choice.view(N, self.n_group, -1)  # (N, G, E/G)
            if self.e_score_correction_bias is not None:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # V3: sum of the group's top-2
            else:
                group_scores = grouped.amax(dim=-1)  # V2: best expert of the group
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            # -inf, never 0: with a negative bias a 0 would outrank the kept experts
            choice = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).view(N, -1)
        return choice.topk(self.K, dim=-1).indices


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int], fp8: bool = False) -> torch.Tensor:
    """Rows of x are sorted by expert, counts[e] rows for expert e; returns rows x_e @ w[e]^T.

    x: (M, in), w: (E, out, in). Only experts that received tokens run. fp8: V3 FP8 GEMMs (nanoseek.fp8)."""
    if fp8:
        from ..fp8 import fp8_linear
    lin = fp8_linear if fp8 else F.linear
    # split/unbind rather than slicing in a loop: their backward is one cat/stack, where every slice's
    # backward would zero-fill a full-size gradient buffer (per expert, per layer)
    outs = [lin(xe, we) for xe, we, c in zip(x.split(counts), w.unbind(0), counts) if c]
    if not outs:
        return x.new_zeros(0, w.shape[1])
    return torch.cat(outs, dim=0)


class Experts(nn.Module):
    """All routed experts as two fused tensors (on disk: one Linear per expert, split/merged by checkpoint.py)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # [gate; up] per expert, nn.Linear layout
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.fp8 = False  # set by nanoseek.fp8.convert_to_fp8_training

    def grouped(self, x: torch.Tensor, which: str, counts: list[int]) -> torch.Tensor:
        """The seam for low-precision variants (nanoseek.quant.QuantizedExperts overrides it): rows of x sorted
        by expert times expert weight `which` ("gate_up_proj" or "down_proj"), only experts with tokens run."""
        return grouped_linear(x, getattr(self, which), counts, self.fp8)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        N, K = ids.shape
        E = self.gate_up_proj.shape[0]
        flat = ids.reshape(-1)  # (N*K,)
        order = flat.argsort(stable=True)  # token-slots sorted by expert
        counts = torch.bincount(flat, minlength=E).tolist()  # the one host sync of the layer
        token = order // K
        # index_select, not x[token]: the same gather, ~2x faster forward and backward on CPU
        h = self.grouped(x.index_select(0, token), "gate_up_proj", counts)  # (N*K, 2I)
        gate, up = h.chunk(2, dim=-1)
        h = self.grouped(F.silu(gate) * up, "down_proj", counts)  # (N*K, D)
        h = h * w.reshape(-1).index_select(0, order).unsqueeze(-1).to(h.dtype)
        return torch.zeros_like(x, dtype=h.dtype).index_add_(0, token, h)  # h is bf16 under autocast


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor, forced_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        ids, w, scores = self.gate(flat, forced_ids.reshape(-1, self.gate.K) if forced_ids is not None else None)
        y = self.experts(flat, ids, w)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        K = self.gate.K
        return y.view(B, T, D), RouterOutput(ids.view(B, T, K), w.view(B, T, K), scores.view(B, T, -1))


# ---------------------------------------------------------------------------------------------- balancing (training)


@torch.no_grad()
def update_expert_bias(model, loads: list[torch.Tensor], gamma: float) -> None:
    """Aux-loss-free balancing (V3 sec. 2.1.2): b_i += gamma * sign(mean load - load_i), per MoE layer.
    `model`: a DeepSeekModel or a list of Gate modules. For a model, `loads` follow its MoE layers in order:
    the main model's (`out.router`), then the MTP modules' (`out.mtp_router`); a shorter list (no MTP in the
    forward) updates only the layers it covers."""
    if isinstance(model, (list, tuple)):
        gates = model
    else:
        gates = [layer.mlp.gate for layer in model.model.layers if layer.is_moe]  # main layers, then MTP modules
    for gate, load in zip(gates, loads):
        if gate.e_score_correction_bias is not None:
            err = load.mean() - load
            gate.e_score_correction_bias.add_(gamma * torch.sign(err).to(gate.e_score_correction_bias))


def load_stats(loads: list[torch.Tensor]) -> dict:
    """max/min load ratio (worst layer) and MaxVio = max_i load_i / mean load - 1 (mean over layers)."""
    if not loads:
        return {}
    ratios = [float(l.max() / l.min().clamp_min(1.0)) for l in loads]
    maxvio = [float(l.max() / l.mean().clamp_min(1e-9) - 1) for l in loads]
    return {"load_max_min_ratio": max(ratios), "maxvio": sum(maxvio) / len(maxvio)}
