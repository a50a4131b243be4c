"""FP8 (E4M3) block quantisation, the DeepSeek-V3 FP8 training GEMM, and FP8-weight inference layers.

Recipe (V3 report sec. 3.3): every GEMM operand is float8_e4m3fn with a fine-grained scale taken from
the current amax (scale = max(amax, 1e-4) / 448): activations and gradients per 1x128 tile (one token,
128 channels), weights per 128x128 block; products accumulate in FP32. Master weights, gradients,
embeddings, output heads, the router, norms and the attention core stay in high precision.

Scale convention (as published checkpoints store it): `weight_scale_inv` is a MULTIPLIER despite its
name, dequantised = fp8 * scale_inv, per block. Every scale in this file follows that convention.

Two paths behind the same functions: the reference path (quantise -> dequantise -> fp32 matmul; runs
anywhere, torch has float8 casts on CPU) and, on Hopper with CUDA >= 12.9, blockwise `F.scaled_mm`
(`torch._scaled_mm` on older torch) with DeepSeek-style 1x128 / 128x128 block scales, every operand
zero-padded to multiples of 128. The fast path is switched on only after a one-off probe matched the
reference path on the device (forward, dgrad, wgrad; a wrong scale layout is off by O(1)). On CUDA the
quantisers are single-pass Triton kernels (nanoseek.fp8_triton), used only after a second probe found them
bit-identical to the PyTorch ops (NANOSEEK_FP8_TRITON=0 turns them off).

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
    s = amax.float().clamp(min=AMAX_EPS)
    s = s / s.new_full((), FP8_MAX)  # a tensor divisor: CUDA turns `/ 448.0` into `* (1/448)`, off by an ulp
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
def _quantize_weight_blocks_torch(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None):
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    wp = F.pad(w.float(), (0, kb * block - K, 0, nb * block - N)).view(nb, block, kb, block)
    s = _scale_from_amax(wp.abs().amax(dim=(1, 3)), scale_fmt)  # (nb, kb)
    q = _to_fp8(wp / s[:, None, :, None]).view(nb * block, kb * block)
    return q[:N, :K].contiguous(), s


def quantize_weight_blocks(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None):
    """w (N, K) -> q float8_e4m3fn (N, K), scale_inv fp32 (ceil(N/block), ceil(K/block)).

    Ragged edge blocks are zero-padded internally (zeros do not change a block's amax); the outputs
    are never padded, matching the checkpoints' layout. On CUDA one Triton kernel does it (bit-identical
    to the PyTorch ops, checked once per device; see nanoseek.fp8_triton)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight_blocks expects a 2-D weight, got shape {list(w.shape)}")
    if block == BLOCK and scale_fmt is None and w.numel() and w.is_cuda:
        from . import fp8_triton as T

        if T.use_triton(w):
            q, _, s, _ = T.weight_operands(w, *w.shape, transposed=False)
            return q, s
    return _quantize_weight_blocks_torch(w, block, scale_fmt)


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
def _quantize_activation_tiles_torch(x: torch.Tensor, tile: int = BLOCK, scale_fmt: str | None = None):
    K = x.shape[-1]
    kt = -(-K // tile)
    xp = F.pad(x.float(), (0, kt * tile - K)).view(*x.shape[:-1], kt, tile)
    s = _scale_from_amax(xp.abs().amax(dim=-1), scale_fmt)  # (..., kt)
    q = _to_fp8(xp / s[..., None]).view(*x.shape[:-1], kt * tile)[..., :K]
    return q.contiguous(), s


def quantize_activation_tiles(x: torch.Tensor, tile: int = BLOCK, scale_fmt: str | None = None):
    """x (..., K) -> q fp8 (..., K), scale fp32 (..., ceil(K/tile)): one scale per token per `tile` channels.

    On CUDA one Triton kernel does it (bit-identical to the PyTorch ops, checked once per device)."""
    if tile == BLOCK and scale_fmt is None and x.dim() >= 1 and x.numel() and x.is_cuda:
        from . import fp8_triton as T

        if T.use_triton(x):
            K = x.shape[-1]
            q, s = T.act_operands(x.reshape(-1, K), -1, K, outer_major=False)
            return q.view(*x.shape[:-1], K), s.view(*x.shape[:-1], -(-K // BLOCK))
    return _quantize_activation_tiles_torch(x, tile, scale_fmt)


def dequantize_activation_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int = BLOCK,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_activation_tiles: q (..., K) fp8, scale (..., ceil(K/tile)) -> (..., K) in `dtype`."""
    expected = [*q.shape[:-1], -(-q.shape[-1] // tile)]
    if list(scale.shape) != expected:
        raise ValueError(f"activation scale for shape {list(q.shape)} with tile {tile} must have shape "
                         f"{expected}, got {list(scale.shape)}")
    return _mul_tiles_(q.to(dtype, memory_format=torch.contiguous_format), scale.float(), tile)


# ---------------------------------------------------------------------------------------------- padding, scale buffers
def _cdiv(n: int, b: int = BLOCK) -> int:
    return -(-n // b)


def _round_up(n: int, b: int = BLOCK) -> int:
    return _cdiv(n, b) * b


def _tile_scales(rows: int, cols: int, device, outer_major: bool) -> torch.Tensor:
    """fp32 (rows, ceil(cols/128)); outer_major: strides (1, rows), the order cuBLAS wants for 1x128 scales."""
    L = _cdiv(cols)
    if outer_major:
        return torch.empty(L, rows, dtype=torch.float32, device=device).t()
    return torch.empty(rows, L, dtype=torch.float32, device=device)


def _block_scale_buffer(nb: int, kb: int, device) -> torch.Tensor:
    """Zeroed (nb, kb rounded up to 4): 128x128 scales in the order cuBLAS wants (pass buffer.t())."""
    return torch.zeros(nb, _round_up(kb, 4), dtype=torch.float32, device=device)


_PROBE_NOTES: dict[tuple[int, str], str] = {}


def _note(device_index: int, what: str, msg: str) -> bool:
    _PROBE_NOTES[(device_index, what)] = msg
    return False


# ---------------------------------------------------------------------------------------------- fast-path operands
# Every operand of the Hopper GEMMs is zero-padded to multiples of 128 in all dims (zeros change no amax and add
# nothing to a sum, so the numerics are exactly the unpadded reference path's) and its scales are laid out as
# cuBLAS wants them. PyTorch versions (reference, fallback) and Triton versions (one kernel each) of each builder.
def _mm_tile_scales(s: torch.Tensor) -> torch.Tensor:
    """1x128 scales (rows, L) with strides (1, rows)."""
    return s.t().contiguous().t()


def _mm_block_buffer(s: torch.Tensor) -> torch.Tensor:
    """128x128 scales (nb, kb), any strides -> a fresh zeroed (nb, kb rounded up to 4) holding them.

    Always a new contiguous tensor: F.pad with zero padding keeps a transposed input's strides, which gave
    cuBLAS a wrongly ordered scale tensor whenever nb was a multiple of 4 (dgrad)."""
    out = _block_scale_buffer(*s.shape, s.device)
    out[:, : s.shape[1]] = s
    return out


def _act_operands_torch(x2, RW, CW):
    R, C = x2.shape
    q, s = _quantize_activation_tiles_torch(F.pad(x2, (0, CW - C, 0, RW - R)))
    return q, _mm_tile_scales(s)


def _cols_operands_torch(x2, RW, CW, rows, x_scale=None):
    R, C = x2.shape
    x = x2.float() if x_scale is None else dequantize_activation_tiles(x2, x_scale)
    xp = F.pad(x, (0, CW - C, 0, RW - R))
    q, s = _act_operands_torch(xp, RW, CW) if rows else (None, None)
    qt, st = _quantize_activation_tiles_torch(xp.t())
    return q, s, qt, _mm_tile_scales(st)


def _weight_operands_torch(w, NW, KW):
    N, K = w.shape
    q, s = _quantize_weight_blocks_torch(F.pad(w, (0, KW - K, 0, NW - N)))
    return q, q.t().contiguous(), _mm_block_buffer(s), _mm_block_buffer(s.t())


def _act_operands(x2, RW, CW):
    if x2.is_cuda:
        from . import fp8_triton as T

        if T.use_triton(x2):
            return T.act_operands(x2, RW, CW)
    return _act_operands_torch(x2, RW, CW)


def _cols_operands(x2, RW, CW, rows, x_scale=None):
    if x2.is_cuda:
        from . import fp8_triton as T

        if T.use_triton(x2):
            return T.cols_operands(x2, RW, CW, rows, x_scale)
    return _cols_operands_torch(x2, RW, CW, rows, x_scale)


def _weight_operands(w, NW, KW):
    if w.is_cuda:
        from . import fp8_triton as T

        if T.use_triton(w):
            return T.weight_operands(w, NW, KW)
    return _weight_operands_torch(w, NW, KW)


# ---------------------------------------------------------------------------------------------- Hopper fast path
def _has_scaled_mm() -> bool:
    return (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")) or hasattr(torch, "_scaled_mm")


def _scaled_mm_nt(a_q, a_s, b_q, b_s, b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, N) = a (M, K) @ b (N, K)^T on Hopper, fp32 accumulation, in out_dtype; all dims multiples of 128.

    a: 1x128 tiles, scales (M, K/128) with strides (1, M). b: 128x128 blocks with scales given as the zeroed
    (N/128, K/128 rounded up to 4) buffer (b_blocks), else 1x128 tiles like a. This is the layout of pytorch's
    test_scaled_matmul_cuda (cuBLAS >= 12.9); _probe_fast_path checks it against the reference on the device."""
    b_s = b_s.t() if b_blocks else b_s
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        ST = F.ScalingType
        return F.scaled_mm(a_q, b_q.t(), a_s, ST.BlockWise1x128, b_s,
                           ST.BlockWise128x128 if b_blocks else ST.BlockWise1x128, output_dtype=out_dtype)
    return torch._scaled_mm(a_q, b_q.t(), a_s, b_s, out_dtype=out_dtype)


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def _fp8_forward(x2: torch.Tensor, weight: torch.Tensor, fast: bool, out_dtype: torch.dtype):
    """y (M, N) = x2 (M, K) @ weight (N, K)^T in out_dtype with the V3 recipe, and what backward needs."""
    if fast:
        (M, K), N = x2.shape, weight.shape[0]
        Mp, Np, Kp = _round_up(M), _round_up(N), _round_up(K)
        qx, sx = _act_operands(x2, Mp, Kp)  # 1x128 tiles along K (the contraction)
        qw, qwt, sw, swt = _weight_operands(weight, Np, Kp)  # 128x128 blocks serve W (fprop) and W^T (dgrad)
        y = _scaled_mm_nt(qx, sx, qw, sw, True, out_dtype)
        return y[:M, :N], (qx, sx, qwt, swt)
    qx, sx = quantize_activation_tiles(x2)
    qw, sw = quantize_weight_blocks(weight)
    with _no_autocast(x2):  # the reference GEMM stays fp32 under autocast too
        y = dequantize_activation_tiles(qx, sx) @ dequantize_weight_blocks(qw, sw).t()  # (M, N) fp32
    return y.to(out_dtype), (qx, sx, qw, sw)


def _fp8_backward(g: torch.Tensor, saved, K: int, fast: bool, need_x: bool, need_w: bool,
                  x_dtype: torch.dtype, w_dtype: torch.dtype):
    """grad_x (M, K) = g (M, N) @ W and grad_w (N, K) = g^T @ x, both GEMMs on FP8 operands."""
    M, N = g.shape
    grad_x = grad_w = None
    if fast:
        qx, sx, qwt, swt = saved
        Mp, Np, Kp = qx.shape[0], qwt.shape[1], qx.shape[1]
        if need_x or need_w:
            # one read of g: 1x128 tiles along N (dgrad) and 128x1 tiles along M, transposed (wgrad)
            qg, sg, qgt, sgt = _cols_operands(g, Mp, Np, need_x) if need_w else (*_act_operands(g, Mp, Np), 0, 0)
        if need_x:
            grad_x = _scaled_mm_nt(qg, sg, qwt, swt, True, x_dtype)[:M, :K]
        if need_w:
            _, _, qxt, sxt = _cols_operands(qx, Mp, Kp, False, sx)  # saved x re-tiled 1x128 -> 128x1
            grad_w = _scaled_mm_nt(qgt, sgt, qxt, sxt, False, w_dtype)[:N, :K]
        return grad_x, grad_w
    qx, sx, qw, sw = saved
    g = g.float()
    with _no_autocast(g):
        if need_x:
            # dgrad (M, K) = g (M, N) @ W (N, K): contraction over N, so g is tiled 1x128 along N
            qg, sg = quantize_activation_tiles(g)
            grad_x = (dequantize_activation_tiles(qg, sg) @ dequantize_weight_blocks(qw, sw)).to(x_dtype)
        if need_w:
            # wgrad (N, K) = g^T (N, M) @ x (M, K): the contraction runs over TOKENS, so both operands are
            # tiled 1x128 along M (g^T and x^T rows; 128x1 tiles of g and x). Each 128-token partial sum
            # then has one scale per operand that factors out of it, which is what a block-scaled
            # tensor-core GEMM needs. x is re-tiled from its saved 1x128-along-K FP8 copy (V3 report:
            # "converted from a 1x128 tile to a 128x1 tile in the backward pass"), so x is never kept.
            x_hat = dequantize_activation_tiles(qx, sx)  # (M, K)
            qxt, sxt = quantize_activation_tiles(x_hat.t())  # (K, M)
            qgt, sgt = quantize_activation_tiles(g.t())  # (N, M)
            grad_w = (dequantize_activation_tiles(qgt, sgt) @ dequantize_activation_tiles(qxt, sxt).t()).to(w_dtype)
    return grad_x, grad_w


@functools.lru_cache(maxsize=None)
def _probe_fast_path(device_index: int) -> bool:
    """True when blockwise scaled_mm runs on this GPU and the fast path (forward, dgrad, wgrad, ragged dims
    padded) matches the reference path there (checked once). A wrong scale layout is off by O(1)."""
    if not _has_scaled_mm():
        return _note(device_index, "fast", "this torch has no scaled_mm")
    if torch.cuda.get_device_capability(device_index)[0] != 9:  # DeepSeek block scaling is an SM90 cuBLAS feature
        return _note(device_index, "fast", "not an SM90 (Hopper) GPU")
    dev = torch.device("cuda", device_index)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    try:
        with torch.autocast("cuda", enabled=False), torch.no_grad():
            g = torch.Generator(device=dev).manual_seed(0)
            # K/128 = 4 and 3, N/128 = 3 and 4: both the padded and the unpadded 128x128 scale buffers, for W and W^T
            for M, K, N in ((256, 512, 384), (200, 320, 512)):
                x, w, gy = (torch.randn(*s, device=dev, generator=g) for s in ((M, K), (N, K), (M, N)))
                for dt in (torch.float32, torch.bfloat16):
                    res = {}
                    for fast in (True, False):
                        y, saved = _fp8_forward(x.to(dt), w, fast, dt)
                        res[fast] = (y, *_fp8_backward(gy.to(dt), saved, K, fast, True, True, dt, w.dtype))
                    for name, a, b in zip(("forward", "dgrad", "wgrad"), res[True], res[False]):
                        if a.shape != b.shape or a.dtype != b.dtype or not rel(a, b) < 1e-2:
                            return _note(device_index, "fast", f"{name} differs from the reference "
                                         f"for {(M, K, N)} {dt}: rel {rel(a, b) if a.shape == b.shape else 'shape'}")
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError) as e:
        return _note(device_index, "fast", f"{type(e).__name__}: {e}")
    return True


def fp8_supported_fast_path(device: torch.device | str | None = None) -> bool:
    """Whether the Hopper scaled_mm path is active for `device` (default: the current CUDA device)."""
    if not torch.cuda.is_available():
        return False
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        return False
    return _probe_fast_path(torch.cuda.current_device() if device.index is None else device.index)


def fp8_backend_info(device: torch.device | str | None = None) -> dict:
    """What the FP8 code uses on `device`: {'fast_path': bool, 'triton_quantize': bool, 'notes': {...}}
    (notes: what the probes found: why one said no, which fp32 -> e4m3 conversion each Triton kernel uses)."""
    fast = fp8_supported_fast_path(device)
    tri = False
    if torch.cuda.is_available():
        d = torch.device("cuda") if device is None else torch.device(device)
        if d.type == "cuda":
            from . import fp8_triton as T

            tri = T.use_triton(torch.empty(0, device=d))
    return {"fast_path": fast, "triton_quantize": tri,
            "notes": {what: msg for (_, what), msg in _PROBE_NOTES.items()}}


def _use_fast(t: torch.Tensor, use_fast_path: bool | None) -> bool:
    ok = t.is_cuda and fp8_supported_fast_path(t.device)
    if use_fast_path and not ok:
        raise ValueError("FP8 fast path needs a Hopper GPU on which blockwise scaled_mm passed its probe")
    return ok if use_fast_path is None else use_fast_path


# ---------------------------------------------------------------------------------------------- training GEMM
class _FP8LinearFn(torch.autograd.Function):
    """y = x W^T + b with all three GEMMs (fprop, dgrad, wgrad) on E4M3 operands, fp32 accumulation."""

    @staticmethod
    def forward(ctx, x, weight, bias, fast, out_dtype):
        N, K = weight.shape
        # 1x128 tiles of x along K and 128x128 blocks of W; only FP8 copies (1 byte/element) and small scales
        # are kept for backward, never x itself; the fp8 weight guarantees dgrad uses exactly the forward operand
        y, saved = _fp8_forward(x.reshape(-1, K), weight, fast, out_dtype if bias is None else torch.float32)
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(*saved)
        ctx.fast, ctx.K, ctx.x_dtype, ctx.has_bias = fast, K, x.dtype, bias is not None
        ctx.w_dtype, ctx.b_dtype = weight.dtype, None if bias is None else bias.dtype
        return y.to(out_dtype).reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, grad_out):
        K, N = ctx.K, grad_out.shape[-1]
        g = grad_out.reshape(-1, N)  # (M, N)
        grad_x, grad_w = _fp8_backward(g, ctx.saved_tensors, K, ctx.fast, ctx.needs_input_grad[0],
                                       ctx.needs_input_grad[1], ctx.x_dtype, ctx.w_dtype)
        if grad_x is not None:
            grad_x = grad_x.reshape(*grad_out.shape[:-1], K)
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.float().sum(dim=0).to(ctx.b_dtype)  # a reduction, not a GEMM: fp32, unquantised
        return grad_x, grad_w, grad_b, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               use_fast_path: bool | None = None) -> torch.Tensor:
    """F.linear with the V3 FP8 recipe in forward and backward. x (..., K), weight (N, K) -> (..., N) in x.dtype,
    or in the autocast dtype where autocast is on (as F.linear); gradients come back in x's and weight's dtypes.

    use_fast_path: None picks the Hopper path when available, False forces the reference path
    (quantise -> dequantise -> fp32 matmul), True demands the fast path (ValueError if unavailable).
    The fast path zero-pads every dim to a multiple of 128 internally, which changes no result."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return _FP8LinearFn.apply(x, weight, bias, _use_fast(x, use_fast_path), out_dtype)


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
    """default_skip plus the MTP block's `eh_proj`, which published FP8 checkpoints keep in bf16 (as
    save_pretrained(fp8=True) writes it), and `kv_a_layernorm` (only nn.Linear modules are ever touched anyway)."""
    return default_skip(name, module) or name.endswith(("kv_a_layernorm", "eh_proj"))


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
        N, K = self.out_features, self.in_features
        if (self.block == BLOCK and N % BLOCK == 0 and K % BLOCK == 0 and x.numel()
                and _use_fast(x, None)):  # the stored fp8 weight is used as is, so N and K must be aligned
            x2 = x.reshape(-1, K)
            M = x2.shape[0]
            qx, sx = _act_operands(x2, _round_up(M), K)
            y = _scaled_mm_nt(qx, sx, self.weight, _mm_block_buffer(self.weight_scale_inv), True, x.dtype)[:M]
            y = y if bias is None else y + bias
            return y.reshape(*x.shape[:-1], N)
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
