"""The DeepSeek-V3 / V3.2 transformer: decoder layers, MTP modules, the causal-LM model.

Module names follow the Hugging Face layout so that checkpoint loading is a key map
(`model.embed_tokens`, `model.layers.N.self_attn.*`, `model.layers.N.mlp.*`, `model.norm`, `lm_head`).
MTP module k is `model.layers[num_hidden_layers + k]`, as in the published checkpoint; it shares the
embedding and the output head with the main model (V3 report, sec. 2.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .layers import MLP, RMSNorm, RotaryEmbedding, init_params
from .mla import MLA
from .moe import MoE, RouterOutput


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    hidden: torch.Tensor  # (B, T, D) final normalised hidden state (what lm_head and MTP module 1 read)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, T-k, V); [:, i] predicts token i+k+1
    router: list[RouterOutput] = field(default_factory=list)  # one per MoE layer of the main model
    mtp_router: list[RouterOutput] = field(default_factory=list)  # one per MTP module run (mtp=True), depth order
    indexer_loss: torch.Tensor | None = None  # mean over DSA layers (MTP modules' too when run) of the indexer KL
    indexer_recall: torch.Tensor | None = None  # mean over the same layers, dense mode with indexer_loss only

    @property
    def expert_ids(self) -> list[torch.Tensor]:
        return [r.expert_ids for r in self.router]

    @property
    def balance_loss(self) -> torch.Tensor | None:
        """Sequence-wise balance loss (V3 eq. 17-20) summed over every MoE layer that ran: the main model's,
        then the MTP modules' when mtp=True (their gates are trained too, so they are balanced too)."""
        routers = self.router + self.mtp_router
        return torch.stack([r.balance_loss for r in routers]).sum() if routers else None


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h, cos, sin, mask, forced_ids=None, **attn_kw):
        a, aux = self.self_attn(self.input_layernorm(h), cos, sin, mask, **attn_kw)
        h = h + a
        x = self.post_attention_layernorm(h)
        router = None
        if self.is_moe:
            m, router = self.mlp(x, forced_ids)
        else:
            m = self.mlp(x)
        return h + m, router, aux


class SharedHead(nn.Module):
    """The MTP module's final norm; its `head` is the main lm_head (tied, stored as a copy on disk)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """MTP module k: h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]), one decoder block, shared_head.norm."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h_prev, emb, cos, sin, mask, forced_ids=None, **attn_kw):
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))  # embedding FIRST
        h, router, aux = super().forward(h, cos, sin, mask, forced_ids, **attn_kw)
        return self.shared_head.norm(h), router, aux


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        N = config.num_hidden_layers
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(N)]
            + [MTPLayer(config, N + k) for k in range(config.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config, config.qk_rope_head_dim)


def build_mask(positions: torch.Tensor, S: int, attention_mask: torch.Tensor | None, cached: bool) -> torch.Tensor:
    """Boolean (B, T, S) mask, True where query t may attend key s; None for plain causal self-attention.

    With a cache, key s sits at absolute position s, so the rule is s <= position of t (stale entries
    beyond a row's length are never visible). Without one, keys are the T inputs themselves, and attention_mask
    is either a (B, T) padding mask or a whole (B, T, T) boolean mask (True = may attend), used as given: packed
    rows where several sequences share a prefix (GRPO's shared-prompt forward) say which token sees which."""
    if cached:
        return torch.arange(S, device=positions.device) <= positions.unsqueeze(-1)
    if attention_mask is None:
        return None  # plain causal: attention takes the fused is_causal path
    if attention_mask.dim() == 3:
        if attention_mask.shape != (*positions.shape, S) or attention_mask.dtype != torch.bool:
            raise ValueError(f"a 3-D attention_mask must be bool {(*positions.shape, S)}, got "
                             f"{attention_mask.dtype} {tuple(attention_mask.shape)}")
        return attention_mask
    B, T = positions.shape
    mask = torch.ones(T, S, dtype=torch.bool, device=positions.device).tril().expand(B, T, S)
    if attention_mask is not None:  # padding (B, S): 1 for real tokens
        mask = mask & attention_mask.bool().unsqueeze(1)
        mask = mask | torch.eye(T, S, dtype=torch.bool, device=positions.device)  # padded rows attend to themselves
    return mask


class DeepSeekModel(nn.Module):
    """DeepSeek-V3 / V3.2 causal LM with MTP modules. One definition for every scale."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for biases and selection bias."""
        init_params(self, self.config.initializer_range, seed)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        self.reset_rope()

    def reset_rope(self) -> None:
        """Recompute the rotary buffers (needed after building on the meta device)."""
        from .layers import yarn_inv_freq

        rot = self.model.rotary
        inv, rot.attention_factor = yarn_inv_freq(self.config, self.config.qk_rope_head_dim)
        rot._master = inv
        rot.inv_freq = inv.to(self.lm_head.weight.device if not self.lm_head.weight.is_meta else "cpu")

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.config.num_hidden_layers:])

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None, num_layers: int | None = None):
        """A LatentCache for this model (the engine calls this on any model class)."""
        from .cache import LatentCache

        p = self.lm_head.weight
        return LatentCache(self.config, batch_size, max_len, dtype or p.dtype, device or p.device, num_layers=num_layers)

    def save_pretrained(self, path, **kw):
        """Write a Hugging Face model folder (see nanoseek.checkpoint.save_pretrained for options)."""
        from ..checkpoint import save_pretrained

        return save_pretrained(self, path, **kw)

    def num_parameters(self, active: bool = False, include_mtp: bool = False) -> int:
        return self.config.num_parameters(active=active, include_mtp=include_mtp)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        absorb: bool = False,
        forced_expert_ids: list[torch.Tensor] | None = None,
        mtp: bool | None = None,
        dsa_dense: bool = False,
        indexer_loss: bool = False,
        logits_to_keep: int | None = None,
    ) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput with logits (B, T, V).

        positions: absolute positions (B, T); default 0..T-1 (or continuing the cache).
        attention_mask: (B, T) padding mask, 1 = real token, or a (B, T, T) bool mask, True = may attend
            (no-cache mode; see build_mask).
        cache: a LatentCache; this step's latents are written at `positions` and attention reads the cache.
        absorb: attend in the absorbed (latent MQA) form instead of the expanded MHA form.
        forced_expert_ids: per MoE layer (B, T, K) expert ids to replay (keep routing).
        mtp: compute MTP logits (default: when training and no cache).
        dsa_dense / indexer_loss: DSA training switches (dense attention in the warm-up; indexer KL).
        logits_to_keep: only compute logits for the last n positions."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a cache")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if mtp is None:
            mtp = self.training and cache is None
        cfg = self.config
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(positions, h.dtype)
        S = cache.kv_len(positions) if cache is not None else T
        mask = build_mask(positions, S, attention_mask, cache is not None)
        attn_kw = dict(cache=cache, positions=positions, absorb=absorb, dsa_dense=dsa_dense, indexer_loss=indexer_loss)
        routers, auxs = [], []
        forced = iter(forced_expert_ids) if forced_expert_ids is not None else None
        for layer in self.model.layers[: cfg.num_hidden_layers]:
            f = next(forced) if (forced is not None and layer.is_moe) else None
            h, router, aux = layer(h, cos, sin, mask, f, **attn_kw)
            if router is not None:
                routers.append(router)
            if aux is not None:
                auxs.append(aux)
        h = self.model.norm(h)
        out_h = h if logits_to_keep is None else h[:, -logits_to_keep:]
        out = ModelOutput(logits=self.lm_head(out_h), hidden=h, router=routers)
        if mtp and cfg.num_nextn_predict_layers and cache is None:
            if attention_mask is not None and attention_mask.dim() == 3:
                raise ValueError("MTP needs a (B, T) padding mask, not a (B, T, T) one: pass mtp=False")
            h_prev = h
            for k, layer in enumerate(self.mtp_layers, start=1):
                if T - k <= 0:
                    break
                emb = self.model.embed_tokens(input_ids[:, k:])  # token i+k for position i
                am = attention_mask[:, k:] if attention_mask is not None else None
                m = build_mask(positions[:, : T - k], T - k, am, False)
                h_prev, router, aux = layer(h_prev[:, :-1], emb, cos[:, : T - k], sin[:, : T - k], m, cache=None,
                                            positions=positions[:, : T - k], absorb=absorb, dsa_dense=dsa_dense,
                                            indexer_loss=indexer_loss)
                if aux is not None:  # the MTP block's indexer selects its keys too: it trains on its KL (V3.2 2.1)
                    auxs.append(aux)
                out.mtp_logits.append(self.lm_head(h_prev))
                if router is not None:
                    out.mtp_router.append(router)
        if auxs:  # every DSA layer that ran, the MTP modules' included (mtp=True)
            out.indexer_loss = torch.stack([a["kl"] for a in auxs]).mean()
            recalls = [a["recall"] for a in auxs if "recall" in a]
            if recalls:
                out.indexer_recall = torch.stack(recalls).nanmean()
        return out

    def mtp_step(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache=None,
                 absorb: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP module (k = 1..D) at inference: h_prev (B,T,D) at positions, next_ids (B,T) the tokens at
        positions+k. Returns (logits (B,T,V) for tokens at positions+k+1, hidden (B,T,D))."""
        layer = self.mtp_layers[k - 1]
        cos, sin = self.model.rotary(positions, h_prev.dtype)
        S = cache.kv_len(positions) if cache is not None else positions.shape[1]
        mask = build_mask(positions, S, None, cache is not None)
        h, _, _ = layer(h_prev, self.model.embed_tokens(next_ids), cos, sin, mask, cache=cache, positions=positions,
                        absorb=absorb)
        return self.lm_head(h), h
