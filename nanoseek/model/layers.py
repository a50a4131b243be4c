"""Building blocks: RMSNorm, rotary embeddings with YaRN, the SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same formula in one operator with one backward node (~20% faster forward + backward at
            # training shapes on CPU, the same values)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # statistics in fp32
        return self.weight * x.to(dtype)


def yarn_inv_freq(config: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary channels, YaRN-blended when rope_scaling says so.

    Returns (inv_freq [dim/2], attention_factor). attention_factor multiplies cos/sin; it is
    mscale/mscale_all_dim, which is 1 for every published DeepSeek config (the temperature lives in the
    softmax scale instead, see ModelConfig.yarn_mscale)."""
    base = config.rope_theta
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)  # never meta
    inv_freq = 1.0 / pos
    if config.rope_type != "yarn":
        return inv_freq, 1.0
    rs = config.rope_scaling
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over orig positions
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies untouched), 0: interpolate (divide by factor)
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        attention_factor = mscale(m) / mscale(m_all) if (m and m_all) else mscale(1.0)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin [..., dim/2] for integer positions; shared by MLA and the DSA indexer."""

    def __init__(self, config: ModelConfig, dim: int):
        super().__init__()
        inv_freq, self.attention_factor = yarn_inv_freq(config, dim)
        self._master = inv_freq
        self.register_buffer("inv_freq", inv_freq.clone(), persistent=False)  # fp32 copy outside the module's buffers

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not self.inv_freq.is_meta:  # model.to(bf16) must not round the frequencies
            self.inv_freq = self._master.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # (B, T, dim/2), always fp32
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x0,x1),(x2,x3).. as laid out in DeepSeek's MLA weights.

    x: (B, T, H, d), cos/sin: (B, T, d/2). The output is written de-interleaved (all first members, then
    all second members); q and k get the same permutation, so every dot product is unchanged and no
    re-interleave copy is needed."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on half-split pairs (x_i, x_{i+d/2}), as the V3.2 indexer uses. x: (B, T, H, d)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x). Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@torch.no_grad()
def init_params(module: nn.Module, std: float, seed: int | None = None) -> None:
    """Normal(0, std) for every matrix, ones for norm weights, zeros for biases (DeepSeek / HF convention)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
