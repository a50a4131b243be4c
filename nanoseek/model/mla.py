"""Multi-head latent attention (DeepSeek-V2/V3) and the V3.2 lightning indexer (DSA).

Shape legend: B = batch, T = query tokens, S = key tokens (cache length), H = heads,
R = kv_lora_rank, r = qk_rope_head_dim, dn = qk_nope_head_dim, dv = v_head_dim.

MLA caches only the normalised latent c (R) and the shared roped key k_pe (r) per token. Two exact
equivalent ways to attend:
  expanded  K = [W_UK c ; k_pe], V = W_UV c per head, then MHA        (training, prefill)
  absorbed  q' = [W_UK^T q_nope ; q_pe] against [c ; k_pe], out = W_UV (P c)  (decode: MQA on the cache)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, rope_half, rope_interleaved


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """A Linear's weight in a compute dtype (dequantised if the layer keeps FP8 weights)."""
    if hasattr(linear, "dequantized_weight"):
        return linear.dequantized_weight()
    return linear.weight


class Indexer(nn.Module):
    """Lightning indexer: I[t,s] = sum_h w[t,h] * ReLU(q_I[t,h] . k_I[s]) * d^-0.5, top-k shared by all heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = config.index_n_heads, config.index_head_dim, config.qk_rope_head_dim
        self.topk = config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        k = self.k_norm(self.wk(x)).unsqueeze(2)  # (B, T, 1, d)
        k = torch.cat([rope_half(k[..., : self.rope_dim], cos, sin), k[..., self.rope_dim:]], dim=-1)  # rope FIRST
        return k.squeeze(2)

    def forward(self, x, q_latent, cos, sin, keys: torch.Tensor) -> torch.Tensor:
        """x (B,T,D), q_latent (B,T,q_lora), keys (B,S,d) from `keys()` (cached ones included).
        Returns index scores (B,T,S) in fp32, unmasked."""
        B, T, _ = x.shape
        q = self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim)
        q = torch.cat([rope_half(q[..., : self.rope_dim], cos, sin), q[..., self.rope_dim:]], dim=-1)
        s = torch.einsum("bthd,bsd->bths", q.float(), keys.float()).relu_() * self.head_dim ** -0.5  # (B,T,h,S)
        w = self.weights_proj(x).float() * self.n_heads ** -0.5  # (B, T, h)
        return torch.einsum("bth,bths->bts", w, s)


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.H = config.num_attention_heads
        self.dn, self.r, self.dv, self.R = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
        D = config.hidden_size
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, self.H * (self.dn + self.r), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.H * (self.dn + self.r), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.R + self.r, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.R, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.R, self.H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.H * self.dv, D, bias=config.attention_bias)
        self.softmax_scale = (self.dn + self.r) ** -0.5 * config.yarn_mscale()
        self.interleaved = config.rope_interleave
        self.indexer = Indexer(config) if config.use_dsa else None

    def forward(self, x, cos, sin, mask, cache=None, positions=None, absorb: bool = False, dsa_dense: bool = False,
                indexer_loss: bool = False):
        """x (B,T,D); cos/sin (B,T,r/2); mask (B,T,S) bool, True = may attend.
        Returns (out (B,T,D), aux): aux is None, or with indexer_loss {"kl": indexer KL, "recall": recall of the
        dense attention's top-k by the indexer's top-k (dense mode only)}."""
        B, T, _ = x.shape
        if hasattr(self, "q_proj"):
            q_latent = None
            q = self.q_proj(x)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent)
        q = q.view(B, T, self.H, self.dn + self.r)
        q_nope, q_pe = q.split([self.dn, self.r], dim=-1)  # nope FIRST, then rope
        rope = rope_interleaved if self.interleaved else rope_half
        q_pe = rope(q_pe, cos, sin)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.R, self.r], dim=-1)
        c = self.kv_a_layernorm(c)
        k_pe = rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # one rope key shared by all heads
        index_keys = None
        if self.indexer is not None:
            # the indexer learns only from its own KL loss: its inputs are detached from the main model
            xi, qi = x.detach(), q_latent.detach()
            index_keys = self.indexer.keys(xi, cos, sin)
        if cache is not None:
            c, k_pe, index_keys = cache.write(self.layer_idx, positions, c, k_pe, index_keys)
        S = c.shape[1]
        if mask is None and (self.indexer is not None or indexer_loss):
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril().expand(B, T, S)

        index_scores, attn_mask = None, mask
        if self.indexer is not None:
            index_scores = self.indexer(xi, qi, cos, sin, index_keys)
            index_scores = index_scores.masked_fill(~mask, float("-inf"))
            if not dsa_dense and self.indexer.topk < S:
                attn_mask = mask & select_topk(index_scores, self.indexer.topk)

        need_probs = indexer_loss and index_scores is not None
        if absorb:
            # W_UK / W_UV are folded into the query and the output, so the weight itself is needed: in high
            # precision (an FP8 layer's weight dequantised), as DeepSeek's inference/model.py absorb path does
            kv_b = dense_weight(self.kv_b_proj).view(self.H, self.dn + self.dv, self.R)
            q_lat = torch.einsum("bthd,hdr->bhtr", q_nope, kv_b[:, : self.dn])  # fold W_UK into the query
            qq = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1)  # (B, H, T, R+r)
            kk = torch.cat([c, k_pe], dim=-1).unsqueeze(1)  # (B, 1, S, R+r): MQA over the latent cache
            vv = c.unsqueeze(1)  # (B, 1, S, R)
        else:
            # a plain GEMM: through the module, so an FP8 layer (training or FP8 weights) runs it as an FP8 GEMM
            kv = self.kv_b_proj(c).view(B, S, self.H, self.dn + self.dv)
            k_nope, v = kv.split([self.dn, self.dv], dim=-1)
            qq = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, dn+r)
            kk = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, self.H, self.r)], dim=-1).transpose(1, 2)
            vv = v.transpose(1, 2)  # (B, H, S, dv)
        if need_probs:
            scores = torch.matmul(qq.float(), kk.float().transpose(-1, -2)) * self.softmax_scale
            probs = scores.masked_fill(~attn_mask.unsqueeze(1), float("-inf")).softmax(dim=-1)
            o = torch.matmul(probs.to(vv.dtype), vv)
        elif attn_mask is not None and not absorb and eager_masked_attention(qq, S):
            probs, o = None, masked_attention(qq, kk, vv, attn_mask, self.softmax_scale)
        else:
            probs, o = None, self._sdpa(qq, kk, vv, attn_mask, absorb)
        if absorb:
            o = torch.einsum("bhtr,hvr->bthv", o, kv_b[:, self.dn:])  # apply W_UV after attention
        else:
            o = o.transpose(1, 2)
        out = self.o_proj(o.reshape(B, T, self.H * self.dv))

        aux = None
        if need_probs:
            aux = {"kl": indexer_kl(probs.detach(), index_scores, attn_mask)}
            if dsa_dense:
                aux["recall"] = indexer_recall(probs.detach(), index_scores, mask, self.indexer.topk)
        return out, aux

    def _sdpa(self, qq, kk, vv, attn_mask, absorb: bool) -> torch.Tensor:
        """Attention through F.scaled_dot_product_attention (its fused kernels): (B, H, T, dv)."""
        B, _, T, _ = qq.shape
        S, dv = kk.shape[2], vv.shape[-1]
        if dv < qq.shape[-1]:  # the fused (flash) CPU/GPU kernels want v's head dim equal to q's: zero-pad v
            vv = F.pad(vv, (0, qq.shape[-1] - dv))
        if absorb:  # one latent K/V head: fold the H query heads into the query length instead of copying K/V
            if attn_mask is None:
                attn_mask = torch.ones(T, S, dtype=torch.bool, device=qq.device).tril(S - T).expand(B, T, S)
            m = attn_mask.unsqueeze(1).expand(B, self.H, T, S).reshape(B, 1, self.H * T, S)
            o = F.scaled_dot_product_attention(qq.reshape(B, 1, self.H * T, -1), kk, vv, attn_mask=m,
                                               scale=self.softmax_scale).view(B, self.H, T, -1)
        elif attn_mask is None:
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=self.softmax_scale)
        else:
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=attn_mask.unsqueeze(1), scale=self.softmax_scale)
        return o[..., :dv]


# Keys per row up to which an explicit mask on CPU (fp32) attends through `masked_attention` rather than SDPA's flash
# kernel: forward + backward 1.1-2.0x faster from 32 to 256 keys at 4-16 heads, 0.80-1.27x at 512-1024 (slower with
# 16 heads; GRPO's packed rows are ~56 keys; benchmarks/bench_attention.py, table in docs/benchmarks.md).
EAGER_MASKED_MAX_KEYS = 256


def eager_masked_attention(q: torch.Tensor, S: int) -> bool:
    """Whether an explicit-mask attention over S keys runs `masked_attention` (CPU, fp32, short rows)."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and S <= EAGER_MASKED_MAX_KEYS


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """softmax(scale q k^T + bias) v, bias = -inf where mask (B, T, S) is False: q, k (B, H, T|S, d), v (B, H, S, dv).
    The scores in one baddbmm that adds the mask as a bias, no padding of v; a row with no visible key gives NaN,
    as SDPA does."""
    B, H, T, d = q.shape
    S = k.shape[2]
    bias = torch.zeros(B, 1, T, S, dtype=q.dtype, device=q.device).masked_fill_(~mask.unsqueeze(1), float("-inf"))
    scores = torch.baddbmm(bias.expand(B, H, T, S).reshape(B * H, T, S), q.reshape(B * H, T, d),
                           k.reshape(B * H, S, d).transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(dim=-1), v.reshape(B * H, S, -1)).view(B, H, T, -1)


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (same shape) of the k largest scores along the last dim, ties going to the lower key index.

    The indexer's ReLU scores tie exactly (often a third are 0.0), and torch.topk's choice among tied values
    depends on the row's length, so with plain topk a request's keys (and its greedy output) changed with
    the padding that batching adds. Here the selection is a pure function of the row's values: the k-th
    largest value v (exact, whatever topk's order), every key above v, and among the keys equal to v the
    lowest indices until k are kept. Padding (-inf, masked anyway) never displaces a real key."""
    kth = scores.topk(k, dim=-1).values[..., -1:]
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= room))


def indexer_kl(probs: torch.Tensor, index_scores: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """V3.2 indexer loss: sum_t KL(p_t || softmax(I_t)) over the support (all causal keys in the dense
    warm-up, the selected top-k in the sparse stage), p_t = main attention summed over heads, L1-normalised.
    Returned as the mean over query tokens."""
    p = probs.sum(1).masked_fill(~support, 0.0)  # (B, T, S)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    logq = index_scores.masked_fill(~support, float("-inf")).log_softmax(-1)
    logq = logq.masked_fill(~support, 0.0)
    kl = (p * (p.clamp_min(1e-20).log() - logq)).sum(-1)
    return kl.mean()


@torch.no_grad()
def indexer_recall(probs: torch.Tensor, index_scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the dense attention's top-k keys (head-summed) that the indexer's top-k also selects, over
    queries that see more than k keys (for the others any selection is exact). NaN if there are none."""
    B, T, S = index_scores.shape
    visible = mask.sum(-1)  # (B, T)
    rows = visible > k
    if not rows.any():
        return torch.tensor(float("nan"))
    p = probs.sum(1).masked_fill(~mask, float("-inf"))[rows]  # (R, S)
    i = index_scores.masked_fill(~mask, float("-inf"))[rows]
    top_p, top_i = select_topk(p, k), select_topk(i, k)  # the indexer's side: the set attention would use
    return ((top_p & top_i).sum(-1).float() / k).mean()
