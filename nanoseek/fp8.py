"""FP8 (E4M3) block quantisation, the DeepSeek-V3 FP8 training GEMM, and FP8-weight inference layers.

Recipe (V3 report sec. 3.3): every GEMM operand is float8_e4m3fn with a fine-grained scale taken from
the current amax (scale = max(amax, 1e-4) / 448): activations and gradients per 1x128 tile (one token,
128 channels), weights per 128x128 block; products accumulate in FP32. Master weights, gradients,
embeddings, output heads, the router, norms and the attention core stay in high precision.

Scale convention (as published checkpoints store it): `weight_scale_inv` is a MULTIPLIER despite its
name, dequantised = fp8 * scale_inv, per block. Every scale in this file follows that convention.

Two paths behind the same functions: the reference path (quantise -> dequantise -> fp32 matmul; runs
anywhere, torch has float8 casts on CPU) and, on Hopper with CUDA >= 12.9, `F.scaled_mm` with
DeepSeek-style 1x128 / 128x128 block scales. The fast path is switched on only after a one-off probe
matched the reference path on the device, and only for dims that are multiples of 128.

Shape legend: M = tokens (leading dims flattened), K = in_features, N = out_features.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn
AMAX_EPS = 1e-4  # V3 recipe: amax is clamped here, so all-zero blocks get a finite scale
BLOCK = 128


def _scale_from_amax(amax: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """fp32 dequantisation multiplier per block; 'ue8m0' rounds it UP to a power of two (V3.1 checkpoints)."""
    s = amax.float().clamp(min=AMAX_EPS) / FP8_MAX
    if scale_fmt == "ue8m0":
        s = torch.exp2(torch.ceil(torch.log2(s)))  # rounding up keeps amax / s <= 448
    elif scale_fmt is not None:
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    return s


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # saturate explicitly: overflow casts differ by backend


def _mul_tiles_(out: torch.Tensor, s: torch.Tensor, tile: int) -> torch.Tensor:
    """In place: out[..., k] *= s[..., k // tile]. out (..., K) contiguous, s (..., ceil(K/tile)).

    Views instead of expanding s to out's size, so dequantising costs the output and nothing else."""
    K = out.shape[-1]
    full = K // tile
    if full:
        out[..., : full * tile].view(*out.shape[:-1], full, tile).mul_(s[..., :full, None])
    if K % tile:  # ragged last tile
        out[..., full * tile:].mul_(s[..., full:])
    return out


# ---------------------------------------------------------------------------------------------- weights: 128x128
def quantize_weight_blocks(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None):
    """w (N, K) -> q float8_e4m3fn (N, K), scale_inv fp32 (ceil(N/block), ceil(K/block)).

    Ragged edge blocks are zero-padded internally (zeros do not change a block's amax); the outputs
    are never padded, matching the checkpoints' layout."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight_blocks expects a 2-D weight, got shape {list(w.shape)}")
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    wp = F.pad(w.float(), (0, kb * block - K, 0, nb * block - N)).view(nb, block, kb, block)
    s = _scale_from_amax(wp.abs().amax(dim=(1, 3)), scale_fmt)  # (nb, kb)
    q = _to_fp8(wp / s[:, None, :, None]).view(nb * block, kb * block)
    return q[:N, :K].contiguous(), s


def dequantize_weight_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (N, K) fp8 and scale_inv (ceil(N/block), ceil(K/block)) -> dense (N, K) in `dtype`.

    Peak memory is the output plus (N, ceil(K/block)) of row-expanded scales. The product is
    formed in fp32 and rounded once to `dtype` (in-place mul of a bf16 tensor by fp32 scales)."""
    if q.dim() != 2:
        raise ValueError(f"dequantize_weight_blocks expects a 2-D weight, got shape {list(q.shape)}")
    N, K = q.shape
    expected = [-(-N // block), -(-K // block)]
    if list(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv for a weight of shape {[N, K]} with block {block} must have "
                         f"shape {expected}, got {list(scale_inv.shape)}")
    out = q.to(dtype, memory_format=torch.contiguous_format)  # fp8 values are exact in bf16/fp16/fp32
    rows = scale_inv.float().repeat_interleave(block, dim=0)[:N]  # (N, ceil(K/block))
    return _mul_tiles_(out, rows, block)


# ---------------------------------------------------------------------------------------------- activations: 1x128
def quantize_activation_tiles(x: torch.Tensor, tile: int = BLOCK, scale_fmt: str | None = None):
    """x (..., K) -> q fp8 (..., K), scale fp32 (..., ceil(K/tile)): one scale per token per `tile` channels."""
    K = x.shape[-1]
    kt = -(-K // tile)
    xp = F.pad(x.float(), (0, kt * tile - K)).view(*x.shape[:-1], kt, tile)
    s = _scale_from_amax(xp.abs().amax(dim=-1), scale_fmt)  # (..., kt)
    q = _to_fp8(xp / s[..., None]).view(*x.shape[:-1], kt * tile)[..., :K]
    return q.contiguous(), s


def dequantize_activation_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int = BLOCK,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_activation_tiles: q (..., K) fp8, scale (..., ceil(K/tile)) -> (..., K) in `dtype`."""
    expected = [*q.shape[:-1], -(-q.shape[-1] // tile)]
    if list(scale.shape) != expected:
        raise ValueError(f"activation scale for shape {list(q.shape)} with tile {tile} must have shape "
                         f"{expected}, got {list(scale.shape)}")
    return _mul_tiles_(q.to(dtype, memory_format=torch.contiguous_format), scale.float(), tile)


# ---------------------------------------------------------------------------------------------- Hopper fast path
def _scaled_mm_nt(a_q, a_s, b_q, b_s, b_blocks: bool) -> torch.Tensor:
    """fp32 (M, N) = a (M, K) @ b (N, K)^T on Hopper. a: 1x128 tiles, scales (M, K/128); b: 128x128
    blocks with scales (N/128, K/128) if b_blocks, else 1x128 tiles with scales (N, K/128).

    cuBLAS (CUDA >= 12.9) wants 1x128 scales outer-dim-major (stride (1, rows)) and 128x128 scales as
    (L4, rows/128), K-major, with L = K/128 padded to a multiple of 4 (pytorch test_scaled_matmul_cuda)."""
    ST = F.ScalingType

    def tiles(s):
        return s.t().contiguous().t(), ST.BlockWise1x128

    def blocks(s):
        return F.pad(s, (0, (-s.shape[1]) % 4)).t(), ST.BlockWise128x128

    sa, ra = tiles(a_s)
    sb, rb = blocks(b_s) if b_blocks else tiles(b_s)
    return F.scaled_mm(a_q.contiguous(), b_q.contiguous().t(), sa, ra, sb, rb, output_dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _probe_fast_path(device_index: int) -> bool:
    """True when blockwise F.scaled_mm runs on this GPU and matches the reference path (checked once)."""
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return False
    if torch.cuda.get_device_capability(device_index)[0] != 9:  # DeepSeek block scaling is an SM90 cuBLAS feature
        return False
    dev = torch.device("cuda", device_index)
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        a, b = (torch.randn(n, 512, device=dev, generator=g) for n in (256, 384))
        (qa, sa), (qb, sb) = quantize_activation_tiles(a), quantize_weight_blocks(b)
        qt, st = quantize_activation_tiles(b)
        da = dequantize_activation_tiles(qa, sa)
        for got, ref in ((_scaled_mm_nt(qa, sa, qb, sb, True), da @ dequantize_weight_blocks(qb, sb).t()),
                         (_scaled_mm_nt(qa, sa, qt, st, False), da @ dequantize_activation_tiles(qt, st).t())):
            if ((got - ref).norm() / ref.norm()).item() > 1e-2:  # a wrong scale layout is off by O(1)
                return False
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False
    return True


def fp8_supported_fast_path(device: torch.device | str | None = None) -> bool:
    """Whether the Hopper F.scaled_mm path is active for `device` (default: the current CUDA device)."""
    if not torch.cuda.is_available():
        return False
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        return False
    return _probe_fast_path(torch.cuda.current_device() if device.index is None else device.index)


def _use_fast(t: torch.Tensor, dims, use_fast_path: bool | None) -> bool:
    # only 128-aligned (M, N, K): the probe and pytorch's own blockwise tests cover nothing else
    ok = all(d % BLOCK == 0 for d in dims) and t.is_cuda and fp8_supported_fast_path(t.device)
    if use_fast_path and not ok:
        raise ValueError(f"FP8 fast path needs a Hopper GPU and dims that are multiples of {BLOCK}, got {list(dims)}")
    return ok if use_fast_path is None else use_fast_path


# ---------------------------------------------------------------------------------------------- training GEMM
class _FP8LinearFn(torch.autograd.Function):
    """y = x W^T + b with all three GEMMs (fprop, dgrad, wgrad) on E4M3 operands, fp32 accumulation."""

    @staticmethod
    def forward(ctx, x, weight, bias, use_fast_path):
        N, K = weight.shape
        x2 = x.reshape(-1, K)  # (M, K)
        qx, sx = quantize_activation_tiles(x2)  # 1x128 tiles along K (the contraction)
        qw, sw = quantize_weight_blocks(weight)  # 128x128: the same blocks serve W (fprop) and W^T (dgrad)
        fast = _use_fast(x, (x2.shape[0], N, K), use_fast_path)
        if fast:
            y = _scaled_mm_nt(qx, sx, qw, sw, True)
        else:
            y = dequantize_activation_tiles(qx, sx) @ dequantize_weight_blocks(qw, sw).t()  # (M, N) fp32
        if bias is not None:
            y = y + bias.float()
        # only FP8 copies (1 byte/element) and small scales are kept for backward, never x itself;
        # the fp8 weight costs 1 B/param and guarantees dgrad uses exactly the forward operand
        ctx.save_for_backward(qx, sx, qw, sw)
        ctx.fast, ctx.x_dtype, ctx.has_bias = fast, x.dtype, bias is not None
        ctx.w_dtype, ctx.b_dtype = weight.dtype, None if bias is None else bias.dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, grad_out):
        qx, sx, qw, sw = ctx.saved_tensors
        N, K = qw.shape
        g = grad_out.reshape(-1, N).float()  # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # dgrad (M, K) = g (M, N) @ W (N, K): contraction over N, so g is tiled 1x128 along N
            qg, sg = quantize_activation_tiles(g)
            if ctx.fast:
                grad_x = _scaled_mm_nt(qg, sg, qw.t().contiguous(), sw.t(), True)
            else:
                grad_x = dequantize_activation_tiles(qg, sg) @ dequantize_weight_blocks(qw, sw)
            grad_x = grad_x.to(ctx.x_dtype).reshape(*grad_out.shape[:-1], K)
        if ctx.needs_input_grad[1]:
            # wgrad (N, K) = g^T (N, M) @ x (M, K): the contraction runs over TOKENS, so both operands are
            # tiled 1x128 along M (g^T and x^T rows; 128x1 tiles of g and x). Each 128-token partial sum
            # then has one scale per operand that factors out of it, which is what a block-scaled
            # tensor-core GEMM needs. x is re-tiled from its saved 1x128-along-K FP8 copy (V3 report:
            # "converted from a 1x128 tile to a 128x1 tile in the backward pass"), so x is never kept.
            x_hat = dequantize_activation_tiles(qx, sx)  # (M, K)
            qxt, sxt = quantize_activation_tiles(x_hat.t())  # (K, M)
            qgt, sgt = quantize_activation_tiles(g.t())  # (N, M)
            if ctx.fast:
                grad_w = _scaled_mm_nt(qgt, sgt, qxt, sxt, False)
            else:
                grad_w = dequantize_activation_tiles(qgt, sgt) @ dequantize_activation_tiles(qxt, sxt).t()
            grad_w = grad_w.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=0).to(ctx.b_dtype)  # a reduction, not a GEMM: fp32, unquantised
        return grad_x, grad_w, grad_b, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               use_fast_path: bool | None = None) -> torch.Tensor:
    """F.linear with the V3 FP8 recipe in forward and backward. x (..., K), weight (N, K) -> (..., N) in x.dtype.

    use_fast_path: None picks the Hopper path when available, False forces the reference path
    (quantise -> dequantise -> fp32 matmul), True demands the fast path (ValueError if unavailable)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    return _FP8LinearFn.apply(x, weight, bias, use_fast_path)


# ---------------------------------------------------------------------------------------------- module swaps
def default_skip(name: str, module: nn.Module) -> bool:
    """Modules kept in high precision (V3 recipe): output heads, embeddings, the MoE router, MTP heads.

    Also the V3.2 indexer's `weights_proj` (a tiny (64, hidden) projection the published V3.2
    checkpoint stores in bf16). Norms and the attention core softmax(QK^T)V are not nn.Linear,
    so they stay high precision without being listed."""
    parts = name.split(".")
    return (parts[-1] in ("lm_head", "gate", "weights_proj") or name.endswith("embed_tokens")
            or "shared_head" in parts)


def default_inference_skip(name: str, module: nn.Module) -> bool:
    """default_skip plus `kv_a_layernorm` (only nn.Linear modules are ever touched anyway)."""
    return default_skip(name, module) or name.endswith("kv_a_layernorm")


def _swap_linears(model: nn.Module, skip, types, make: Callable[[nn.Linear], nn.Module]) -> list[str]:
    if type(model) in types:
        raise ValueError("the module itself is a Linear; pass its parent so the child can be swapped in place")
    done = []
    for name, module in list(model.named_modules()):
        if type(module) in types and not skip(name, module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, make(module))
            done.append(name)
    return done


class FP8Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) whose forward runs the V3 FP8 recipe (fp8_linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """A new FP8Linear holding the SAME Parameter objects (built on meta: nothing is allocated)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new


def convert_to_fp8_training(model: nn.Module, skip: Callable[[str, nn.Module], bool] = default_skip) -> list[str]:
    """Swap every plain nn.Linear in `model` for an FP8Linear sharing its Parameters; returns the names.

    Optimizers built before or after keep working (same Parameter objects). High precision stays with
    whatever `skip(name, module)` says (default: lm_head, embed_tokens, *.gate, shared_head, weights_proj)
    and with everything that is not an nn.Linear: norms, the attention core, fused expert tensors.
    Hooks registered on the old Linear modules do not move to the new ones.
    Modules with an `fp8` flag (nanoseek's fused routed experts) are switched to FP8 GEMMs too."""
    names = _swap_linears(model, skip, (nn.Linear,), FP8Linear.from_linear)
    for name, m in model.named_modules():
        if hasattr(m, "fp8") and not skip(name, m) and not m.fp8:
            m.fp8 = True
            names.append(name)
    return names


class QuantizedLinear(nn.Module):
    """Inference Linear with the weight kept in FP8, as published checkpoints store it.

    Parameters (requires_grad=False): `weight` float8_e4m3fn (out, in), `weight_scale_inv` fp32
    (ceil(out/128), ceil(in/128)), optional `bias`; so state_dict keys are the checkpoint's names.
    Forward dequantises the weight to x.dtype per call (exactly F.linear(x, dequantized_weight(x.dtype)))
    or, on Hopper, multiplies FP8 operands directly with 1x128 activation tiles (V3 inference recipe).
    `.to(dtype)` / `.half()` move the FP8 weight and its scales between devices but never recast them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block: int = BLOCK,
                 device=None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.compute_dtype = compute_dtype  # default dtype of dequantized_weight()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        scale_shape = (-(-out_features // block), -(-in_features // block))
        self.weight_scale_inv = nn.Parameter(torch.ones(scale_shape, dtype=torch.float32, device=device),
                                             requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_fmt: str | None = None, block: int = BLOCK) -> "QuantizedLinear":
        """Quantise linear.weight into 128x128 blocks (a meta Linear gives an empty meta QuantizedLinear)."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, block=block,
                  device="meta", compute_dtype=w.dtype)
        if w.is_meta:
            return new
        q, s = quantize_weight_blocks(w.detach(), block, scale_fmt)
        new.weight = nn.Parameter(q, requires_grad=False)
        new.weight_scale_inv = nn.Parameter(s, requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return new

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (out, in) weight in `dtype` (default self.compute_dtype)."""
        return dequantize_weight_blocks(self.weight, self.weight_scale_inv, self.block, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        x2 = x.reshape(-1, self.in_features)
        if self.block == BLOCK and _use_fast(x, (x2.shape[0], self.out_features, self.in_features), None):
            qx, sx = quantize_activation_tiles(x2)
            y = _scaled_mm_nt(qx, sx, self.weight, self.weight_scale_inv, True).to(x.dtype)
            y = y if bias is None else y + bias
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        keep = (self.weight, self.weight_scale_inv)

        def keep_dtype(t):
            out = fn(t)
            if out.dtype != t.dtype and any(t is k for k in keep):
                if t is self.weight and out.dtype.is_floating_point and out.dtype.itemsize > 1:
                    self.compute_dtype = out.dtype  # model.to(float32) -> dequantise to float32
                out = t.to(out.device)  # device moves only: a lossy recast of fp8 data or scales is discarded
            return out

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block={self.block}, compute_dtype={self.compute_dtype}")


def quantize_model_for_inference(model: nn.Module, skip: Callable[[str, nn.Module], bool] = default_inference_skip,
                                 scale_fmt: str | None = None) -> list[str]:
    """Swap nn.Linear (and FP8Linear) modules for QuantizedLinear in place; returns the swapped names.

    On a meta-device model the new modules are empty meta modules, ready for to_empty + load_state_dict."""
    return _swap_linears(model, skip, (nn.Linear, FP8Linear),
                         lambda m: QuantizedLinear.from_linear(m, scale_fmt=scale_fmt))
