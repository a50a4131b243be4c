"""ModelConfig: one flat dataclass with Hugging Face `config.json` field names, named presets,
validation, and parameter counts computed from the numbers alone (no weights allocated).

Field names follow transformers' DeepseekV3Config / DeepseekV32Config so that reading and writing
`config.json` is a key copy. DeepSeek's reference names are given in comments where they differ.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _is_int(v) -> bool:
    """An int that is not a bool (JSON `true` must not pass as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


class HFConfigFile:
    """config.json in and out for config dataclasses with to_hf_dict() / from_hf_dict(d, source)."""

    def save(self, path: str | os.PathLike) -> Path:
        """Write config.json into directory `path` (atomically)."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        target = p / "config.json"
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a config.json file, or the config.json inside a directory."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise FileNotFoundError(f"no config.json at {p}")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a JSON object, got a JSON {type(d).__name__}")
        return cls.from_hf_dict(d, source=str(p))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass
class ModelConfig(HFConfigFile):
    vocab_size: int = 129280
    hidden_size: int = 7168  # [dim]
    intermediate_size: int = 18432  # [inter_dim] dense-layer SwiGLU width
    moe_intermediate_size: int = 2048  # [moe_inter_dim] one routed / shared expert's width
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3  # [n_dense_layers]
    num_attention_heads: int = 128
    # MLA
    q_lora_rank: int | None = 1536  # None: a single q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8  # [n_activated_experts]
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5  # [route_scale]
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc": selection bias e_score_correction_bias; "greedy"/"group_limited_greedy": none
    norm_topk_prob: bool = True
    # norms, positions
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", ...}
    max_position_embeddings: int = 163840
    rope_interleave: bool = True
    # MTP
    num_nextn_predict_layers: int = 1
    # DSA (V3.2 lightning indexer); index_topk None means dense attention (V3)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int | None = None
    # misc
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None  # present for FP8 checkpoints

    # ------------------------------------------------------------------ derived
    @property
    def model_type(self) -> str:
        return "deepseek_v32" if self.index_topk is not None else "deepseek_v3"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def use_dsa(self) -> bool:
        return self.index_topk is not None

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace) if self.n_routed_experts else 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Main layers below first_k_dense_replace are dense; MTP layers (index >= num_hidden_layers) are MoE
        whenever the model has experts, as in the published V3 checkpoint."""
        return bool(self.n_routed_experts) and layer_idx >= self.first_k_dense_replace

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default")) or "default"

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, name: str, value: Any, why: str) -> None:
            if not cond:
                raise ValueError(f"ModelConfig.{name} {why}, got {value!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            v = getattr(self, name)
            need(_is_int(v) and v > 0, name, v, "must be a positive integer")
        need(_is_int(self.qk_nope_head_dim) and self.qk_nope_head_dim >= 0, "qk_nope_head_dim",
             self.qk_nope_head_dim, "must be a non-negative integer")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim, "must be even (RoPE rotates pairs)")
        need(self.q_lora_rank is None or (_is_int(self.q_lora_rank) and self.q_lora_rank > 0), "q_lora_rank",
             self.q_lora_rank, "must be a positive integer or null")
        need(_is_int(self.first_k_dense_replace) and 0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             self.first_k_dense_replace, f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.scoring_func in ("sigmoid", "softmax"), "scoring_func", self.scoring_func, "must be 'sigmoid' or 'softmax'")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"), "topk_method", self.topk_method,
             "must be 'noaux_tc', 'greedy' or 'group_limited_greedy'")
        need(self.hidden_act == "silu", "hidden_act", self.hidden_act, "must be 'silu' (SwiGLU experts)")
        need(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "must be > 0")
        need(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        need(_is_int(self.num_nextn_predict_layers) and self.num_nextn_predict_layers >= 0,
             "num_nextn_predict_layers", self.num_nextn_predict_layers, "must be an integer >= 0")
        if self.n_routed_experts:
            E, K = self.n_routed_experts, self.num_experts_per_tok
            need(_is_int(E) and E > 0, "n_routed_experts", E, "must be a positive integer or 0 (dense model)")
            need(_is_int(K) and 0 < K <= E, "num_experts_per_tok", K, f"must be in [1, n_routed_experts={E}]")
            need(_is_int(self.n_group) and self.n_group >= 1 and E % self.n_group == 0, "n_group", self.n_group,
                 f"must be >= 1 and divide n_routed_experts={E}")
            need(_is_int(self.topk_group) and 1 <= self.topk_group <= self.n_group, "topk_group",
                 self.topk_group, f"must be in [1, n_group={self.n_group}]")
            per_group = E // self.n_group
            need(self.topk_group * per_group >= K, "topk_group", self.topk_group,
                 f"leaves {self.topk_group * per_group} selectable experts, fewer than num_experts_per_tok={K}")
            if self.n_group > 1 and self.topk_method == "noaux_tc":
                need(per_group >= 2, "n_group", self.n_group, "must leave >= 2 experts per group (group score = top-2 sum)")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", self.moe_intermediate_size, "must be > 0")
            need(_is_int(self.n_shared_experts) and self.n_shared_experts >= 0, "n_shared_experts",
                 self.n_shared_experts, "must be an integer >= 0 (0: no shared expert)")
            need(self.routed_scaling_factor > 0, "routed_scaling_factor", self.routed_scaling_factor, "must be > 0")
        if self.rope_scaling is not None:
            need(isinstance(self.rope_scaling, dict), "rope_scaling", self.rope_scaling, "must be a dict or null")
            rt = self.rope_type
            need(rt in ("default", "yarn"), "rope_scaling", self.rope_scaling, "must have type 'yarn' (or 'default')")
            if rt == "yarn":
                f = self.rope_scaling.get("factor")
                need(isinstance(f, (int, float)) and f >= 1, "rope_scaling.factor", f, "must be a number >= 1")
                o = self.rope_scaling.get("original_max_position_embeddings")
                need(_is_int(o) and o > 0, "rope_scaling.original_max_position_embeddings", o,
                     "must be a positive integer")
        if self.index_topk is not None:
            need(_is_int(self.index_topk) and self.index_topk > 0, "index_topk", self.index_topk, "must be > 0")
            need(self.q_lora_rank is not None, "q_lora_rank", self.q_lora_rank,
                 "must be set when index_topk is set (the indexer reads the query latent)")
            need(self.index_n_heads > 0, "index_n_heads", self.index_n_heads, "must be > 0")
            need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim", self.index_head_dim,
                 f"must be >= qk_rope_head_dim={self.qk_rope_head_dim}")
        need(self.torch_dtype in ("float32", "bfloat16", "float16"), "torch_dtype", self.torch_dtype,
             "must be 'float32', 'bfloat16' or 'float16'")

    # ------------------------------------------------------------------ counting
    def num_parameters(self, active: bool = False, include_mtp: bool = False, include_embeddings: bool = True) -> int:
        """Total (or active-per-token) parameter count, computed from the config alone.

        Active counts only num_experts_per_tok of the routed experts. MTP modules are excluded by
        default, as in the V3 report's 671B / 37B (the 685B checkpoint includes the 14B MTP module)."""
        D = self.hidden_size
        H = self.num_attention_heads
        attn = 0
        if self.q_lora_rank is None:
            attn += D * H * self.qk_head_dim
        else:
            attn += D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        attn += D * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        attn += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        attn += H * self.v_head_dim * D
        if self.use_dsa:
            Ih, Id = self.index_n_heads, self.index_head_dim
            attn += self.q_lora_rank * Ih * Id + D * Id + 2 * Id + D * Ih
        dense_mlp = 3 * D * self.intermediate_size
        expert = 3 * D * self.moe_intermediate_size
        n_routed = self.num_experts_per_tok if active else self.n_routed_experts
        moe_mlp = (n_routed + self.n_shared_experts) * expert + self.n_routed_experts * D if self.n_routed_experts else 0
        norms = 2 * D

        def layer(i: int) -> int:
            return attn + norms + (moe_mlp if self.is_moe_layer(i) else dense_mlp)

        total = sum(layer(i) for i in range(self.num_hidden_layers)) + D  # + final norm
        if include_embeddings:
            total += self.vocab_size * D * (1 if self.tie_word_embeddings else 2)
        if include_mtp:
            for k in range(self.num_nextn_predict_layers):
                total += layer(self.num_hidden_layers + k) + 2 * D + 2 * D * D + D  # enorm, hnorm, eh_proj, head norm
        return total

    # ------------------------------------------------------------------ HF config.json
    def to_hf_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if d["quantization_config"] is None:
            del d["quantization_config"]
        if not self.use_dsa:
            del d["index_topk"]  # index_n_heads / index_head_dim stay: they size the indexer once DSA is switched on
        d["model_type"] = self.model_type
        d["architectures"] = ["DeepseekV32ForCausalLM" if self.use_dsa else "DeepseekV3ForCausalLM"]
        d["num_key_value_heads"] = self.num_attention_heads
        d["moe_layer_freq"] = 1
        d["use_cache"] = True
        d["attention_dropout"] = 0.0
        # transformers >= 5 reads rope_parameters; older readers (vLLM, SGLang, DeepSeek code) read rope_scaling
        rp = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rp.update({k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")})
            d["rope_scaling"] = {**{k: v for k, v in self.rope_scaling.items() if k != "rope_type"}, "type": self.rope_type}
        d["rope_parameters"] = rp
        if self.n_routed_experts == 0:  # a dense model: every layer dense for every reader (transformers takes
            d["first_k_dense_replace"] = self.num_hidden_layers  # only ints; vLLM builds MoE from this index on)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        d = dict(d)
        mt = d.get("model_type", "deepseek_v3")
        if mt not in ("deepseek_v3", "deepseek_v32", "deepseek_v2", "kimi_k2"):
            raise ValueError(f"{source}: model_type must be 'deepseek_v3' or 'deepseek_v32', got {mt!r}")
        rp = d.pop("rope_parameters", None)
        rs = d.get("rope_scaling")
        if rp is not None and isinstance(rp, dict):
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp["rope_theta"])
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rs is None and rtype not in (None, "default"):
                d["rope_scaling"] = {"type": rtype, **{k: v for k, v in rp.items() if k not in ("rope_type", "type", "rope_theta")}}
        if isinstance(d.get("rope_scaling"), dict):
            rs = dict(d["rope_scaling"])
            if "rope_type" in rs:
                rs["type"] = rs.pop("rope_type")
            if rs.get("type") in (None, "default"):
                rs = None
            d["rope_scaling"] = rs
        if d.get("n_routed_experts") is None:
            d["n_routed_experts"] = 0
        if "n_shared_experts" in d and d["n_shared_experts"] is None:
            d["n_shared_experts"] = 0  # DeepSeek-V2's config: None = no shared expert (transformers takes only ints)
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        d.setdefault("num_nextn_predict_layers", 0)  # a config that does not mention MTP has none
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        if mt == "deepseek_v32":
            d.setdefault("index_topk", 2048)
            d.setdefault("index_n_heads", 64)
            d.setdefault("index_head_dim", 128)
        else:
            d["index_topk"] = None
        if mt == "deepseek_v2" and "topk_method" not in d:
            d["topk_method"] = "greedy"
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if name not in kwargs:
                raise ValueError(f"{source}: required field {name!r} is missing")
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        d = dataclasses.asdict(PRESETS[name])
        d.update(overrides)
        return cls(**d)

    def yarn_mscale(self) -> float:
        """Softmax-scale multiplier from YaRN: (0.1 * mscale_all_dim * ln(factor) + 1)^2 (V3: 1.1352^2)."""
        if self.rope_type != "yarn":
            return 1.0
        f = float(self.rope_scaling.get("factor", 1.0))
        m = float(self.rope_scaling.get("mscale_all_dim", 0) or 0)
        if not m or f <= 1:
            return 1.0
        s = 0.1 * m * math.log(f) + 1.0
        return s * s


_V3 = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
    topk_group=4, routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
    rope_theta=10000.0, max_position_embeddings=163840, num_nextn_predict_layers=1,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
)

PRESETS: dict[str, ModelConfig] = {}


def _preset(name: str, **kw) -> None:
    PRESETS[name] = ModelConfig(**kw)


# tiny: ~2M parameters, a CPU forward in milliseconds; every feature on (MLA with q_lora, MoE with groups, MTP).
_preset("tiny", vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, max_position_embeddings=2048, num_nextn_predict_layers=1,
        initializer_range=0.02, torch_dtype="float32", index_n_heads=4, index_head_dim=32)
# small: ~75M parameters
_preset("small", vocab_size=32768, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=4096,
        num_nextn_predict_layers=1, torch_dtype="bfloat16", index_n_heads=8, index_head_dim=64)
_preset("deepseek-v2-lite", vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0, scoring_func="softmax",
        topk_method="greedy", norm_topk_prob=False, max_position_embeddings=163840, num_nextn_predict_layers=0,
        bos_token_id=100000, eos_token_id=100001,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
_preset("deepseek-v3", **_V3)
_preset("deepseek-v3.2", **_V3, index_n_heads=64, index_head_dim=128, index_topk=2048)
