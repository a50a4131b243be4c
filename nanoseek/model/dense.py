"""The dense student: a decoder-only transformer laid out exactly as transformers' `Qwen2ForCausalLM`, the
family DeepSeek-R1 was distilled into (R1 report, sec. 2.4: DeepSeek-R1-Distill-Qwen-1.5B ... 32B).

Architecture (Qwen2 / Qwen2.5):
  - grouped-query attention (num_key_value_heads <= num_attention_heads), biases on q/k/v, none on o
  - RoPE on half-split pairs (x_i, x_{i+d/2}) with base rope_theta, no scaling
  - SwiGLU MLP, pre-norm RMSNorm, optional tied input/output embeddings
Module names equal the HF ones, so `state_dict()` keys are the checkpoint's tensor names.

`DenseModel.forward` has DeepSeekModel's signature and returns the same ModelOutput (router lists empty),
so trainers and the generation engine take either model; `DenseKVCache` mirrors LatentCache's interface.

Simplifications: no sliding-window layers (every published Qwen2.5 / R1-Distill config has
use_sliding_window false), no rope_scaling, no Llama-style students (no attention_bias switch).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HFConfigFile
from .layers import MLP, RMSNorm, init_params, rope_half
from .transformer import ModelOutput, build_mask


# ---------------------------------------------------------------------------------------------- config
@dataclass
class DenseConfig(HFConfigFile):
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    initializer_range: float = 0.02

    # ------------------------------------------------------------------ derived
    model_type = "qwen2"  # class attributes, not fields: fixed for this architecture
    num_nextn_predict_layers = 0  # duck-typing with ModelConfig for code that asks (no MTP, no DSA)
    use_dsa = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, name: str, value: Any, why: str) -> None:
            if not cond:
                raise ValueError(f"DenseConfig.{name} {why}, got {value!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, v, "must be a positive integer")
        H, Hkv = self.num_attention_heads, self.num_key_value_heads
        need(self.hidden_size % H == 0, "hidden_size", self.hidden_size,
             f"must be divisible by num_attention_heads={H} (head_dim = hidden_size / heads)")
        need(H % Hkv == 0, "num_attention_heads", H, f"must be divisible by num_key_value_heads={Hkv}")
        need(self.head_dim % 2 == 0, "hidden_size", self.hidden_size,
             f"gives an odd head_dim={self.head_dim} (RoPE rotates pairs)")
        need(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "must be > 0")
        need(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        need(self.initializer_range > 0, "initializer_range", self.initializer_range, "must be > 0")
        need(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings", self.tie_word_embeddings,
             "must be true or false")
        need(self.torch_dtype in ("float32", "bfloat16", "float16"), "torch_dtype", self.torch_dtype,
             "must be 'float32', 'bfloat16' or 'float16'")

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count from the numbers alone (tied embeddings counted once)."""
        D, d, H, Hkv = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        attn = (D + 1) * H * d + 2 * (D + 1) * Hkv * d + H * d * D  # q, k, v with biases; o without
        layer = attn + 3 * D * self.intermediate_size + 2 * D
        total = self.num_hidden_layers * layer + D
        if include_embeddings:
            total += self.vocab_size * D * (1 if self.tie_word_embeddings else 2)
        return total

    # ------------------------------------------------------------------ HF config.json
    def to_hf_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu", use_cache=True,
                 attention_dropout=0.0, use_sliding_window=False, sliding_window=None,
                 max_window_layers=self.num_hidden_layers, rope_scaling=None,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "DenseConfig":
        d = dict(d)
        mt = d.get("model_type", "qwen2")
        if mt != "qwen2":
            raise ValueError(f"{source}: model_type must be 'qwen2' for a dense student, got {mt!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act must be 'silu' (SwiGLU), got {d['hidden_act']!r}")
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window is true; sliding-window layers are not supported")
        rp = d.get("rope_parameters") or {}
        rs = d.get("rope_scaling") or {}
        for name, r in (("rope_parameters", rp), ("rope_scaling", rs)):
            rtype = r.get("rope_type", r.get("type", "default")) if isinstance(r, dict) else r
            if rtype not in (None, "default"):
                raise ValueError(f"{source}: {name} type {rtype!r} is not supported (only plain RoPE)")
        if "rope_theta" in rp:
            d.setdefault("rope_theta", rp["rope_theta"])
        if "dtype" in d and "torch_dtype" not in d:  # transformers >= 5 writes `dtype`
            d["torch_dtype"] = d["dtype"]
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if name not in d:
                raise ValueError(f"{source}: required field {name!r} is missing")
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d["num_attention_heads"]
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            cfg = cls(**{k: v for k, v in d.items() if k in known})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None
        if d.get("head_dim") not in (None, cfg.head_dim):
            raise ValueError(f"{source}: head_dim {d['head_dim']} != hidden_size / num_attention_heads = {cfg.head_dim}")
        return cfg


    # ------------------------------------------------------------------ students
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DenseConfig":
        if name not in DENSE_PRESETS:
            raise ValueError(f"unknown dense preset {name!r}; choose one of {sorted(DENSE_PRESETS)}")
        return dataclasses.replace(DENSE_PRESETS[name], **overrides)

    @classmethod
    def sized(cls, vocab_size: int, hidden_size: int, num_hidden_layers: int, head_dim: int = 32,
              kv_groups: int = 2, mlp_ratio: float = 3.0, **overrides) -> "DenseConfig":
        """A Qwen2-shaped config for a vocabulary and a width: heads = hidden / head_dim, kv heads = heads /
        kv_groups (at least 1), intermediate = mlp_ratio * hidden rounded up to a multiple of 32."""
        if hidden_size % head_dim:
            raise ValueError(f"DenseConfig.hidden_size must be a multiple of head_dim={head_dim}, got {hidden_size}")
        H = hidden_size // head_dim
        Hkv = max(1, H // kv_groups)
        while H % Hkv:  # keep heads divisible by kv heads
            Hkv -= 1
        inter = -(-int(mlp_ratio * hidden_size) // 32) * 32
        kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=H, num_key_value_heads=Hkv, intermediate_size=inter)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def student_of(cls, teacher, hidden_size: int | None = None, num_hidden_layers: int | None = None,
                   preset: str = "student-tiny", **overrides) -> "DenseConfig":
        """A student for `teacher` (a ModelConfig or DenseConfig): the teacher's vocabulary, special tokens, context
        length and dtype, the preset's shape, re-derived by `sized` when hidden_size is given."""
        base = cls.from_preset(preset)
        shared = dict(vocab_size=teacher.vocab_size, bos_token_id=teacher.bos_token_id,
                      eos_token_id=copy.deepcopy(teacher.eos_token_id), pad_token_id=getattr(teacher, "pad_token_id", None),
                      max_position_embeddings=teacher.max_position_embeddings, torch_dtype=teacher.torch_dtype)
        layers = num_hidden_layers if num_hidden_layers is not None else base.num_hidden_layers
        if hidden_size is not None:
            return cls.sized(hidden_size=hidden_size, num_hidden_layers=layers, head_dim=base.head_dim,
                             tie_word_embeddings=base.tie_word_embeddings, rms_norm_eps=base.rms_norm_eps,
                             rope_theta=base.rope_theta, **{**shared, **overrides})
        return dataclasses.replace(base, num_hidden_layers=layers, **{**shared, **overrides})


DENSE_PRESETS: dict[str, DenseConfig] = {
    # ~1.05M parameters with the tiny teacher's 2048-token vocabulary (tied embeddings): a CPU student
    "student-tiny": DenseConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, torch_dtype="float32"),
    # ~30M parameters with a 32768-token vocabulary (the `small` teacher's)
    "student-small": DenseConfig(vocab_size=32768, hidden_size=384, intermediate_size=1152, num_hidden_layers=8,
                                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096,
                                 tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16"),
    # the published DeepSeek-R1-Distill-Qwen-1.5B shape
    "r1-distill-qwen-1.5b": DenseConfig(),
}


# ---------------------------------------------------------------------------------------------- KV cache
class DenseKVCache:
    """K and V per layer, (L, B, max_len, Hkv, d) each, with LatentCache's semantics: rows are independent slots,
    each write lands at that row's absolute positions, and entries past a row's position are never read (the
    cached mask admits only key positions <= the query's)."""

    def __init__(self, config: DenseConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", num_layers: int | None = None):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        L = num_layers if num_layers is not None else config.num_hidden_layers
        shape = (L, batch_size, max_len, config.num_key_value_heads, config.head_dim)
        self.max_len = max_len
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._kv_len = 0
        self.rows: torch.Tensor | None = None  # rows_view: the rows of the batch, in this cache's tensors

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def bytes_per_token(self) -> int:
        """Cache bytes per token summed over layers (K and V)."""
        L, _, _, Hkv, d = self.k.shape
        return 2 * L * Hkv * d * self.k.element_size()

    def kv_len(self, positions: torch.Tensor) -> int:
        """Keys to read for this step: up to the largest position written (one host sync per forward)."""
        n = int(positions.max()) + 1
        if n > self.max_len:
            raise ValueError(f"position {n - 1} is beyond the cache length {self.max_len}")
        self._kv_len = n
        return n

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v (B, T, Hkv, d) at `positions` (B, T); return the readable prefix (B, S, Hkv, d) x2."""
        B = positions.shape[0]
        sel = self.rows if self.rows is not None else torch.arange(B, device=positions.device)
        rows = sel.unsqueeze(1).expand_as(positions)
        kb, vb = self.k[layer], self.v[layer]
        kb[rows, positions] = k.to(kb.dtype)
        vb[rows, positions] = v.to(vb.dtype)
        S = self._kv_len
        if self.rows is not None:
            return kb[sel, :S], vb[sel, :S]
        return kb[:B, :S], vb[:B, :S]

    def row_view(self, s: int) -> "DenseKVCache":
        """A batch-1 cache aliasing row s (writes land in this cache's tensors)."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, s:s + 1], self.v[:, s:s + 1]
        return view

    def rows_view(self, rows: list[int]) -> "DenseKVCache":
        """A batch-len(rows) cache over these rows of this one, in any order (LatentCache.rows_view)."""
        view = copy.copy(self)
        view.rows = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        return view

    def copy_rows(self, src: list[int], dst: list[int], n: int) -> None:
        """Rows dst[i] take the first n positions of rows src[i] (prefix reuse, a prompt's other samples), in one
        indexed copy."""
        s, d = torch.tensor(src, device=self.k.device), torch.tensor(dst, device=self.k.device)
        self.k[:, d, :n] = self.k[:, s, :n]
        self.v[:, d, :n] = self.v[:, s, :n]


# ---------------------------------------------------------------------------------------------- model
class DenseRotary(nn.Module):
    """cos/sin (B, T, d/2) for integer positions; inv_freq = theta^(-2i/d), kept in fp32."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.dim, self.theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", self._inv_freq("cpu"), persistent=False)

    def _inv_freq(self, device) -> torch.Tensor:
        return 1.0 / self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim)

    def reset(self, device) -> None:
        self.inv_freq = self._inv_freq(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.dtype != torch.float32:  # a model-wide .to(bf16) rounded it: recompute exactly
            self.reset(self.inv_freq.device)
        freqs = positions.float()[..., None] * self.inv_freq  # (B, T, d/2), always fp32
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


class GQAttention(nn.Module):
    """Grouped-query attention: H query heads share Hkv key/value heads (H / Hkv queries per group)."""

    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.Hkv, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.H * self.d, bias=True)
        self.k_proj = nn.Linear(D, self.Hkv * self.d, bias=True)
        self.v_proj = nn.Linear(D, self.Hkv * self.d, bias=True)
        self.o_proj = nn.Linear(self.H * self.d, D, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, positions=None):
        """x (B,T,D); cos/sin (B,T,d/2); mask (B,T,S) bool (True = may attend) or None for plain causal."""
        B, T, _ = x.shape
        q = rope_half(self.q_proj(x).view(B, T, self.H, self.d), cos, sin)
        k = rope_half(self.k_proj(x).view(B, T, self.Hkv, self.d), cos, sin)
        v = self.v_proj(x).view(B, T, self.Hkv, self.d)
        if cache is not None:
            k, v = cache.write(self.layer_idx, positions, k, v)  # (B, S, Hkv, d)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T|S, d)
        gqa = self.H != self.Hkv
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.H * self.d))


class DenseDecoderLayer(nn.Module):
    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = GQAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h, cos, sin, mask, cache=None, positions=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class DenseBackbone(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DenseDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = DenseRotary(config)  # buffer not persistent: not in state_dict


class DenseModel(nn.Module):
    """Qwen2-layout dense causal LM (the distillation student). Same forward contract as DeepSeekModel."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config
        self.model = DenseBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding with lm_head when tie_word_embeddings (again after to_empty, which unties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for biases."""
        init_params(self, self.config.initializer_range, seed)
        self.reset_rope()

    def reset_rope(self) -> None:
        """Recompute the rotary buffer in fp32 (needed after building on the meta device or a dtype cast)."""
        w = self.lm_head.weight
        self.model.rotary.reset("cpu" if w.is_meta else w.device)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def mtp_layers(self) -> list:
        return []

    def num_parameters(self, include_embeddings: bool = True) -> int:
        return self.config.num_parameters(include_embeddings=include_embeddings)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device=None,
                  num_layers: int | None = None) -> DenseKVCache:
        """A DenseKVCache for this model (dtype/device default to the model's)."""
        w = self.lm_head.weight
        return DenseKVCache(self.config, batch_size, max_len, dtype if dtype is not None else w.dtype,
                            device if device is not None else w.device, num_layers=num_layers)

    def save_pretrained(self, path, **kw):
        """Write a Hugging Face Qwen2 folder (see nanoseek.model.dense_checkpoint.save_dense for options)."""
        from .dense_checkpoint import save_dense

        return save_dense(self, path, **kw)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: DenseKVCache | None = None,
        absorb: bool = False,
        forced_expert_ids: list[torch.Tensor] | None = None,
        mtp: bool | None = None,
        dsa_dense: bool = False,
        indexer_loss: bool = False,
        logits_to_keep: int | None = None,
    ) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput with logits (B, T, V); DeepSeekModel's contract.

        positions: absolute positions (B, T); default 0..T-1 (required with a cache).
        attention_mask: (B, T) padding mask, 1 = real token, or a (B, T, T) bool mask, True = may attend
            (no-cache mode; see build_mask).
        cache: a DenseKVCache; this step's K/V are written at `positions` and attention reads the cache.
        absorb, forced_expert_ids, mtp, dsa_dense, indexer_loss: MLA/MoE/MTP/DSA switches, ignored here.
        logits_to_keep: only compute logits for the last n positions."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a cache")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(positions, h.dtype)
        S = cache.kv_len(positions) if cache is not None else T
        mask = build_mask(positions, S, attention_mask, cache is not None)  # None: plain causal, fused path
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, cache, positions)
        h = self.model.norm(h)
        out_h = h if logits_to_keep is None else h[:, -logits_to_keep:]
        return ModelOutput(logits=self.lm_head(out_h), hidden=h)
