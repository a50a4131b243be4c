"""Weight-only quantisation for inference, applied from outside the model: `quantize(model, "int8")`.

Formats (FORMATS): fp32 (nothing changes), bf16 (the whole model in bf16, router and selection bias still
computed in fp32 by the Gate), int8 (symmetric, one scale per output channel), int8-g128 and int4-g128
(symmetric, one scale per 128 input channels of each output channel; int4 packs two values per byte), fp8
(E4M3 with 128x128 block scales, the published DeepSeek layout: nanoseek.fp8). Quantised: every nn.Linear but
the ones published checkpoints keep in high precision (fp8.default_inference_skip: embeddings, heads, the
router, the indexer's weights_proj, the MTP eh_proj) and the fused routed experts (QuantizedExperts, through the
`Experts.grouped` seam). Activations stay in the model's dtype; a quantised weight is dequantised per call
(int8 per channel on CPU runs torch's int8 weight-only kernel instead, tested against the dequantised path).

On disk (`save_quantized`, `load_quantized`): the HF layout, one tensor per expert; int weights as I8 (int8)
or U8 (int4, two per byte, low nibble first) with a fp32 `weight_scale` of shape (out, ceil(in / group)),
config.json `quantization_config = {"quant_method": "nanoseek", "format": ...}` (nanoseek reads it; other
loaders do not know it). bf16 folders and fp8 folders (`weight_scale_inv`, quant_method "fp8") are the
standard layouts that transformers, vLLM and SGLang read.

Shape legend: N = out_features, K = in_features, G = ceil(K / group), E = routed experts, D = hidden,
I = expert width.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import (BLOCK, FP8_DTYPE, QuantizedLinear, _mul_tiles_, _swap_linears, default_inference_skip,
                  dequantize_weight_blocks, quantize_weight_blocks)
from .model.moe import Experts

FORMATS = ("fp32", "bf16", "int8", "int8-g128", "int4-g128", "fp8")
INT_FORMATS = {"int8": (8, None), "int8-g128": (8, 128), "int4-g128": (4, 128)}  # format -> (bits, group; None = K)
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [BLOCK, BLOCK]}  # as checkpoint.save_pretrained(fp8=True) writes it


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantisation format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def quantization_config(fmt: str) -> dict | None:
    """config.json's quantization_config for a model quantised to `fmt` (None: a plain float folder)."""
    if fmt == "fp8":
        return dict(FP8_QUANTIZATION_CONFIG)
    if fmt in INT_FORMATS:
        bits, group = INT_FORMATS[fmt]
        return {"quant_method": "nanoseek", "format": fmt, "bits": bits, "group_size": group,
                "symmetric": True, "scale_dtype": "float32"}
    return None


def stored_format(config) -> str | None:
    """The format a config's quantization_config names: an INT_FORMATS key, "fp8", or None (plain floats)."""
    qc = getattr(config, "quantization_config", None)
    if not qc:
        return None
    if qc.get("quant_method") == "fp8":
        return "fp8"
    if qc.get("quant_method") == "nanoseek":
        fmt = qc.get("format")
        if fmt not in INT_FORMATS:
            raise ValueError(f"config.json quantization_config.format {fmt!r} is not one of {', '.join(INT_FORMATS)}")
        return fmt
    raise ValueError(f"config.json quantization_config.quant_method {qc.get('quant_method')!r} is not supported "
                     f"(nanoseek reads 'fp8' and 'nanoseek')")


# ---------------------------------------------------------------------------------------------- int tensors
def quantize_int(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., N, K) float -> q, scale fp32 (..., N, G). Symmetric round-to-nearest: scale = amax / qmax per group,
    q = round(w / scale) in [-qmax, qmax], so |w - q * scale| <= scale / 2. q: int8 (..., N, K) for 8 bits,
    uint8 (..., N, ceil(K/2)) for 4 bits (two values per byte, the even column in the low nibble)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    K = w.shape[-1]
    g = K if group is None else group
    if g < 1:
        raise ValueError(f"group size must be >= 1, got {g}")
    G = -(-K // g)
    wp = F.pad(w.float(), (0, G * g - K)).view(*w.shape[:-1], G, g)  # zero padding leaves amax unchanged
    qmax = 2 ** (bits - 1) - 1
    amax = wp.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))  # an all-zero group: any scale, q = 0
    q = torch.round(wp / scale[..., None]).clamp_(-qmax, qmax).to(torch.int8).view(*w.shape[:-1], G * g)[..., :K]
    return (pack_int4(q) if bits == 4 else q.contiguous()), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 (..., K) in [-8, 7] -> uint8 (..., ceil(K/2)): even columns in the low nibble, odd in the high."""
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(p: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 (..., ceil(K/2)) -> int8 (..., K)."""
    nib = torch.stack([p & 0xF, p >> 4], dim=-1).view(*p.shape[:-1], -1)[..., :K].to(torch.int8)
    return nib - ((nib >= 8).to(torch.int8) << 4)  # sign-extend 4 bits


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, bits: int, group: int | None, K: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q and scale as quantize_int returns them -> (..., N, K) in `dtype` (product in fp32, rounded once)."""
    v = unpack_int4(q, K) if bits == 4 else q
    out = v.to(torch.float32, memory_format=torch.contiguous_format)
    return _mul_tiles_(out, scale.float(), K if group is None else group).to(dtype)


# ---------------------------------------------------------------------------------------------- modules
def int8_kernel_applies(x: torch.Tensor, K: int) -> bool:
    """Whether `int8_weight_only_mm` runs x (..., K): a CPU float tensor with rows, K a multiple of 16 (the bf16
    kernel reads 16 columns at a time: at other K it crashes or misreads, measured on torch 2.13)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.numel() > 0 and K % 16 == 0
            and hasattr(torch, "_weight_int8pack_mm"))


def int8_weight_only_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (q * scale)^T in x's dtype, for int8 q (N, K) and fp32 per-row scales (N,), without materialising
    the dense weight: torch's CPU int8 weight-only GEMM on bf16 activations (w8a16), accumulated in fp32 and rounded
    once to bf16; the scales are applied after, in fp32 (the kernel would take them in bf16). Its fp32-activation
    variant is a scalar loop, 8-30x slower than dequantising on an AVX-512 CPU; this one takes 0.5-1.3x the time of
    the fp32 GEMM on the dense weight at decode shapes (docs/benchmarks.md). The bf16 rounding of x and of the sum is the accuracy
    cost, measured with the format's (docs/results.md)."""
    ones = _ONES.get(q.shape[0])
    if ones is None or ones.device != q.device:
        ones = _ONES[q.shape[0]] = torch.ones(q.shape[0], dtype=torch.bfloat16, device=q.device)
    y = torch.mul(torch._weight_int8pack_mm(x.to(torch.bfloat16), q, ones), scale)  # bf16 x fp32 -> fp32
    return y if x.dtype == torch.float32 else y.to(x.dtype)


_ONES: dict[int, torch.Tensor] = {}  # int8_weight_only_mm's unit scales, one per width


class _KeepStoredDtypes:
    """`.to(dtype)` moves the stored weights and scales between devices but never recasts them."""

    _stored = ()

    def _apply(self, fn, recurse=True):
        keep = [getattr(self, n) for n in self._stored]

        def keep_dtype(t):
            out = fn(t)
            if out.dtype != t.dtype and any(t is k for k in keep):
                out = t.to(out.device)
            return out

        return super()._apply(keep_dtype, recurse)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class IntLinear(_KeepStoredDtypes, nn.Module):
    """Weight-only int8/int4 Linear. Parameters (no grad): `weight` int8 (N, K) or uint8 (N, ceil(K/2)),
    `weight_scale` fp32 (N, G), optional `bias`; state_dict keys are the on-disk names."""

    _stored = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bits: int, group: int | None, bias: bool = False,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        Kq = in_features if bits == 8 else -(-in_features // 2)
        G = 1 if group is None else -(-in_features // group)
        dt = torch.int8 if bits == 8 else torch.uint8
        self.weight = _frozen(torch.zeros(out_features, Kq, dtype=dt, device=device))
        self.weight_scale = _frozen(torch.ones(out_features, G, dtype=torch.float32, device=device))
        self.bias = _frozen(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group: int | None) -> "IntLinear":
        new = cls(linear.in_features, linear.out_features, bits, group, bias=linear.bias is not None, device="meta")
        if linear.weight.is_meta:
            return new
        q, s = quantize_int(linear.weight.detach(), bits, group)
        new.weight, new.weight_scale = _frozen(q), _frozen(s)
        if linear.bias is not None:
            new.bias = _frozen(linear.bias.detach().clone())
        return new

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int(self.weight, self.weight_scale, self.bits, self.group, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.bits == 8 and self.group is None and int8_kernel_applies(x, self.in_features):
            y = int8_weight_only_mm(x.reshape(-1, self.in_features), self.weight, self.weight_scale[:, 0])
            y = y.view(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group={self.group or self.in_features}, bias={self.bias is not None}")


class QuantizedExperts(_KeepStoredDtypes, Experts):
    """Fused routed experts with quantised weights: `gate_up_proj` (E, 2I, D) and `down_proj` (E, D, I) hold the
    stored values (int8 / packed uint8 / fp8), `gate_up_proj_scale` and `down_proj_scale` their scales (int:
    (E, rows, G) fp32; fp8: 128x128 blocks, the gate and up halves blocked separately, as one Linear each on
    disk). Only the experts that received tokens are dequantised, one at a time (the `grouped` seam)."""

    _stored = ("gate_up_proj", "down_proj", "gate_up_proj_scale", "down_proj_scale")

    def __init__(self, E: int, D: int, I: int, fmt: str, device=None):
        nn.Module.__init__(self)
        self.fmt, self.D, self.I, self.fp8 = fmt, D, I, False
        if fmt == "fp8":
            nb = lambda n: -(-n // BLOCK)
            shapes = {"gate_up_proj": ((E, 2 * I, D), (E, 2 * nb(I), nb(D))), "down_proj": ((E, D, I), (E, nb(D), nb(I)))}
            dt = FP8_DTYPE
        else:
            bits, group = INT_FORMATS[fmt]
            G = lambda K: 1 if group is None else -(-K // group)
            Kq = lambda K: K if bits == 8 else -(-K // 2)
            shapes = {"gate_up_proj": ((E, 2 * I, Kq(D)), (E, 2 * I, G(D))), "down_proj": ((E, D, Kq(I)), (E, D, G(I)))}
            dt = torch.int8 if bits == 8 else torch.uint8
        for name, (wshape, sshape) in shapes.items():
            setattr(self, name, _frozen(torch.zeros(wshape, dtype=dt, device=device)))
            setattr(self, name + "_scale", _frozen(torch.ones(sshape, dtype=torch.float32, device=device)))

    @classmethod
    def from_experts(cls, ex: Experts, fmt: str) -> "QuantizedExperts":
        E, I2, D = ex.gate_up_proj.shape
        new = cls(E, D, I2 // 2, fmt, device="meta")
        if ex.gate_up_proj.is_meta:
            return new
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(ex, name).detach()
            if fmt == "fp8":  # per expert and per on-disk Linear (gate, up, down): 2-D block quantisation
                parts = w.chunk(2, dim=1) if name == "gate_up_proj" else (w,)
                qs = [[quantize_weight_blocks(p[e]) for e in range(E)] for p in parts]
                q = torch.cat([torch.stack([x[0] for x in part]) for part in qs], dim=1)
                s = torch.cat([torch.stack([x[1] for x in part]) for part in qs], dim=1)
            else:
                q, s = quantize_int(w, *INT_FORMATS[fmt])
            setattr(new, name, _frozen(q))
            setattr(new, name + "_scale", _frozen(s))
        return new

    def expert_weight(self, which: str, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert e's dense (out, in) weight `which` ("gate_up_proj" or "down_proj") in `dtype`."""
        q, s = getattr(self, which)[e], getattr(self, which + "_scale")[e]
        K = self.D if which == "gate_up_proj" else self.I
        if self.fmt != "fp8":
            return dequantize_int(q, s, *INT_FORMATS[self.fmt], K, dtype)
        if which == "down_proj":
            return dequantize_weight_blocks(q, s, dtype=dtype)
        h = s.shape[0] // 2
        return torch.cat([dequantize_weight_blocks(q[: self.I], s[:h], dtype=dtype),
                          dequantize_weight_blocks(q[self.I:], s[h:], dtype=dtype)])

    def grouped(self, x: torch.Tensor, which: str, counts: list[int]) -> torch.Tensor:
        if self.fmt == "int8" and int8_kernel_applies(x, x.shape[-1]):  # per channel: the int8 kernel, no dequantising
            q, s = getattr(self, which), getattr(self, which + "_scale")
            outs = [int8_weight_only_mm(xe, q[e], s[e, :, 0]) for e, (xe, c) in enumerate(zip(x.split(counts), counts)) if c]
        else:
            outs = [F.linear(xe, self.expert_weight(which, e, x.dtype))
                    for e, (xe, c) in enumerate(zip(x.split(counts), counts)) if c]
        if not outs:
            out = (2 * self.I) if which == "gate_up_proj" else self.D
            return x.new_zeros(0, out)
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return f"experts={self.gate_up_proj.shape[0]}, hidden={self.D}, width={self.I}, format={self.fmt}"


QUANTIZED_MODULES = (IntLinear, QuantizedExperts, QuantizedLinear)  # what engine.fast_decode cannot pack


def model_format(model: nn.Module) -> str:
    """The format a model is in: the quantised modules it holds, else bf16 / fp32 by its floating weights."""
    for m in model.modules():
        if isinstance(m, QuantizedExperts):
            return m.fmt
        if isinstance(m, IntLinear):
            return next(k for k, v in INT_FORMATS.items() if v == (m.bits, m.group))
        if isinstance(m, QuantizedLinear):
            return "fp8"
    dts = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return "bf16" if dts == {torch.bfloat16} else "fp32"


# ---------------------------------------------------------------------------------------------- the swap
def quantize(model: nn.Module, fmt: str, skip=default_inference_skip) -> list[str]:
    """Quantise `model` in place to `fmt` (FORMATS) and return the names of the modules changed.

    Works on any model of nn.Linear modules (the dense student too); DeepSeek's fused routed experts become
    QuantizedExperts. A meta-device model gets empty meta modules (for loading a quantised folder). A
    DeepSeekModel's config gets the matching quantization_config, so save_quantized writes it."""
    check_format(fmt)
    current = model_format(model)
    if current not in ("fp32", "bf16") or (current == "bf16" and fmt != "bf16"):
        raise ValueError(f"the model is already quantised to {current}; load the float checkpoint to quantise it to {fmt}")
    names: list[str] = []
    if fmt == "bf16":
        model.to(torch.bfloat16)  # the Gate keeps its selection bias in fp32 and scores in fp32 whatever the dtype
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Experts))]
    elif fmt != "fp32":
        if fmt == "fp8":
            names = _swap_linears(model, skip, (nn.Linear,), QuantizedLinear.from_linear)
        else:
            bits, group = INT_FORMATS[fmt]
            names = _swap_linears(model, skip, (nn.Linear,), lambda m: IntLinear.from_linear(m, bits, group))
        for name, m in list(model.named_modules()):
            if type(m) is Experts and not skip(name, m):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, QuantizedExperts.from_experts(m, fmt))
                names.append(name)
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "quantization_config") and hasattr(cfg, "replace"):
        kw = {"quantization_config": quantization_config(fmt)}
        if fmt == "bf16":
            kw["torch_dtype"] = "bfloat16"
        model.config = cfg.replace(**kw)
    return names


def quantizable_parameters(config) -> int:
    """Parameters `quantize` stores in the low-precision format (MTP modules included): the Linears outside
    fp8.default_inference_skip and the routed experts. Counted on a meta-device model (nothing allocated)."""
    from .model import DeepSeekModel

    with torch.device("meta"):
        model = DeepSeekModel(config)
    n = 0
    for name, m in model.named_modules():
        if (type(m) is nn.Linear or type(m) is Experts) and not default_inference_skip(name, m):
            n += sum(p.numel() for p in m.parameters(recurse=False))
    return n


KV_CACHE_FORMATS = ("fp32", "bf16", "fp8", "fp8-deepseek")


def kv_cache_bytes_per_token(config, num_layers: int | None = None) -> dict[str, int]:
    """Latent-cache bytes per token over `num_layers` layers (default: the main layers, what `Engine` holds; the
    speculative decoder's cache adds the MTP layers) in each KV_CACHE_FORMATS entry. Per layer `LatentCache`
    stores kv_lora_rank + qk_rope_head_dim values (latent c, roped shared key), plus index_head_dim for DSA's
    indexer keys, all in one dtype: fp32 / bf16 / fp8 give 4 / 2 / 1 bytes a value (nanoseek's engine keeps the
    model's dtype; fp8 is the arithmetic of an all-e4m3 cache). fp8-deepseek is the layout DeepSeek's kernels
    use (FlashMLA's FP8 cache, V3.2's reference indexer): latent in e4m3 with one fp32 scale per 128 values,
    rope key in bf16, indexer keys in e4m3 with one fp32 scale per 128 (V3: 656 bytes a layer)."""
    L = config.num_hidden_layers if num_layers is None else num_layers
    R, r = config.kv_lora_rank, config.qk_rope_head_dim
    idx = config.index_head_dim if config.use_dsa else 0
    values = R + r + idx
    blocks = -(-R // 128) + (-(-idx // 128) if idx else 0)
    deepseek = R + 2 * r + idx + 4 * blocks
    return {"fp32": 4 * L * values, "bf16": 2 * L * values, "fp8": L * values, "fp8-deepseek": L * deepseek}


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state in memory (every stored tensor once: tied weights count once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if not t.is_meta else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------- on disk
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)(_scale)?$")


def _hf_pieces(model) -> list[tuple[str, tuple, str]]:
    """(model state key, index into that tensor, HF tensor name) for every tensor of the HF layout: experts one
    Linear each (gate / up / down, rows of the fused tensors), MTP copies of the embedding and head."""
    cfg = model.config
    fmt = model_format(model)
    scale_suffix = "weight_scale_inv" if fmt == "fp8" else "weight_scale"
    out = []
    for name, t in model.state_dict().items():
        m = _EXPERT_KEY.match(name)
        if m:
            prefix, which, is_scale = m.groups()
            suffix = scale_suffix if is_scale else "weight"
            for e in range(t.shape[0]):
                if which == "gate_up_proj":
                    h = t.shape[1] // 2
                    out.append((name, (e, slice(0, h)), f"{prefix}.{e}.gate_proj.{suffix}"))
                    out.append((name, (e, slice(h, 2 * h)), f"{prefix}.{e}.up_proj.{suffix}"))
                else:
                    out.append((name, (e,), f"{prefix}.{e}.down_proj.{suffix}"))
        elif not (name == "lm_head.weight" and cfg.tie_word_embeddings):
            out.append((name, (), name))
    for k in range(cfg.num_nextn_predict_layers):
        i = cfg.num_hidden_layers + k
        out.append(("model.embed_tokens.weight", (), f"model.layers.{i}.embed_tokens.weight"))
        out.append(("lm_head.weight", (), f"model.layers.{i}.shared_head.head.weight"))
    return out


def save_quantized(model, path, tokenizer=None, max_shard_bytes: int = 5 * 1024 ** 3) -> Path:
    """Write a (quantised or float) DeepSeekModel as stored: the HF layout, its quantization_config in config.json.
    Loading it back (load_quantized) gives the same tensors bit for bit."""
    from .checkpoint import write_shards

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    tensors = {hf: sd[name][idx].detach().cpu().contiguous() for name, idx, hf in _hf_pieces(model)}
    write_shards(folder, tensors, max_shard_bytes)
    fmt = model_format(model)
    config = model.config.replace(quantization_config=quantization_config(fmt))
    if fmt in ("fp32", "bf16"):
        config = config.replace(torch_dtype="bfloat16" if fmt == "bf16" else "float32")
    config.save(folder)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def load_quantized(path, device="cpu", dtype: torch.dtype = torch.float32):
    """A DeepSeekModel from a folder written by save_quantized (or save_pretrained(fp8=True), or a published FP8
    checkpoint), its weights kept as stored: int and fp8 weights and their scales bit for bit; the float tensors
    in `dtype` (bf16 for a bf16 format). One CheckpointError lists every missing, unexpected or mis-typed tensor."""
    from .checkpoint import CheckpointError, _load_config, _Reader
    from .config import ModelConfig
    from .model import DeepSeekModel

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config = _load_config(ModelConfig, folder)
    try:
        fmt = stored_format(config)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    if fmt is None:
        fmt = "bf16" if config.torch_dtype == "bfloat16" and dtype == torch.bfloat16 else "fp32"
    with torch.device("meta"):
        model = DeepSeekModel(config)
    model.to(dtype)
    quantize(model, fmt)
    model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()
    reader = _Reader(folder)
    present = set(reader.keys())
    pieces = _hf_pieces(model)
    sd = model.state_dict()
    problems = []
    wanted = {hf for _, _, hf in pieces}
    missing = sorted(wanted - present)
    unexpected = sorted(present - wanted)
    for kind, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            problems.append(f"{kind} tensors ({len(names)}): {', '.join(names[:20])}" + (" ..." if len(names) > 20 else ""))
    exact = (torch.int8, torch.uint8, FP8_DTYPE)
    st_name = {torch.int8: "I8", torch.uint8: "U8", FP8_DTYPE: "F8_E4M3"}
    for name, idx, hf in pieces:
        if hf not in present:
            continue
        target = sd[name][idx]
        if reader.shape(hf) != tuple(target.shape):
            problems.append(f"{hf}: shape {list(reader.shape(hf))}, expected {list(target.shape)} ({fmt} format)")
        elif target.dtype in exact and reader.dtype(hf) != st_name[target.dtype]:
            problems.append(f"{hf}: dtype {reader.dtype(hf)}, expected {st_name[target.dtype]} ({fmt} format)")
        elif target.dtype not in exact and reader.dtype(hf) not in ("F32", "BF16", "F16", "F64"):
            problems.append(f"{hf}: dtype {reader.dtype(hf)}, expected a floating-point tensor")
    if problems:
        raise CheckpointError(f"{folder}: checkpoint does not match its config.json ({fmt} format):\n  "
                              + "\n  ".join(problems))
    with torch.no_grad():
        for name, idx, hf in pieces:
            sd[name][idx].copy_(reader.get(hf))
    model.eval()
    return model


def folder_format(path) -> str | None:
    """The quantisation format a model folder's config.json names (None: plain floats, or not a DeepSeek folder)."""
    cfg_path = Path(path) / "config.json"
    try:
        d = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(d, dict):
        return None
    return stored_format(type("C", (), {"quantization_config": d.get("quantization_config")}))


def load_for_inference(path, quantize_to: str | None = None, device="cpu"):
    """Any model folder nanoseek loads, in the format asked for: a folder already quantised loads as stored
    (asking for another format is an error: quantising dequantised values again would compound the errors);
    a float folder loads in fp32 and is quantised to `quantize_to` (None or fp32: as is)."""
    if quantize_to is not None:
        check_format(quantize_to)
    stored = folder_format(path)
    if stored in INT_FORMATS or (stored == "fp8" and quantize_to == "fp8"):
        if quantize_to not in (None, stored):
            raise ValueError(f"{path} holds {stored} weights; it cannot be loaded as {quantize_to} "
                             f"(quantise the float checkpoint instead, or leave out --quantize)")
        return load_quantized(path, device)
    from .model import load_model

    model = load_model(path, dtype=torch.float32, device=device)
    if quantize_to not in (None, "fp32"):
        quantize(model, quantize_to)
    return model
