"""Single-pass Triton quantisers for the Hopper FP8 fast path (nanoseek.fp8), used on CUDA only.

nanoseek.fp8's PyTorch quantisers are 5-7 separate kernels each (pad, abs, amax, clamp, div, clamp, cast), which on
a GPU cost more than the FP8 GEMM saves. These kernels do each quantisation in one pass over the data and write
straight into the zero-padded, cuBLAS-ordered buffers the fast path wants. They compute exactly what the PyTorch
ops compute (amax, max(amax, 1e-4) / 448 and x / s correctly rounded, RNE cast), and are used only after
`probe` has found them bit-identical to the PyTorch ops on the device (NANOSEEK_FP8_TRITON=0 or
TRITON_QUANTIZE = False turns them off).
"""

from __future__ import annotations

import functools
import json
import os

import torch

from .fp8 import (BLOCK, FP8_DTYPE, _PROBE_NOTES, _act_operands_torch, _block_scale_buffer, _cdiv,
                  _cols_operands_torch, _note, _quantize_activation_tiles_torch, _quantize_weight_blocks_torch,
                  _round_up, _tile_scales, _weight_operands_torch)

try:  # CUDA builds of torch ship Triton; CPU-only installs need none of it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

TRITON_QUANTIZE = os.environ.get("NANOSEEK_FP8_TRITON", "1") != "0"  # False: always the PyTorch quantisers
# Launch shapes (none changes a result; benchmarks/bench_fp8.py --quant times the alternatives): rows per program
# and warps of the 1x128-only kernel, warps of the two-way tile kernel and of the weight-block kernel; tmode 1:
# transposed copies are transposed in registers, as fp32, before the e4m3 conversion, 0: stored through transposed
# pointers. The defaults were the fastest bit-identical ones on an H100 (docs/benchmarks.md);
# NANOSEEK_FP8_TRITON_LAUNCH='{"cols_warps": 16}' overrides entries.
TRITON_LAUNCH = {"rows_br": 32, "rows_warps": 4, "cols_warps": 8, "cols_tmode": 1, "blocks_warps": 8,
                 "blocks_tmode": 1}
TRITON_LAUNCH.update(json.loads(os.environ.get("NANOSEEK_FP8_TRITON_LAUNCH", "{}")))

if triton is not None:
    @triton.jit
    def _to_e4m3(v, q_ty: tl.constexpr, SOFT: tl.constexpr):
        """v fp32 in [-448, 448] -> float8_e4m3fn, round to nearest even. SOFT: c10's own bit arithmetic
        (fp8e4m3fn_from_fp32_value, what torch's .to(float8_e4m3fn) runs), else the hardware conversion."""
        if SOFT:
            bits = v.to(tl.uint32, bitcast=True)
            sign = bits & 0x80000000
            a = bits ^ sign
            odd = (a >> 20) & 1
            normal = (a + 0xC4000000 + 0x7FFFF + odd) >> 20  # rebias 127 -> 7, round the 20 dropped bits
            sub = (tl.abs(v) + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000  # |v| < 2^-6: 2^-9 steps
            r = tl.where(a < 0x3C800000, sub, normal) | (sign >> 24)
            return (r & 0xFF).to(tl.uint8).to(q_ty, bitcast=True)
        return v.to(q_ty)

    @triton.jit
    def _tiles_kernel(x_ptr, xs_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, R, C, RW, CW,
                      sx_r, sxs_r, sxs_c, sq_r, ss_r, ss_c, sqt_r, sst_r, sst_c,
                      DEQ: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, BR: tl.constexpr,
                      T: tl.constexpr, SOFT: tl.constexpr, TMODE: tl.constexpr):
        """One (BR, T) block of x (R, C); rows >= R or cols >= C read as zeros, outputs cover (RW, CW).
        ROWS: 1x128 tiles along C -> q (RW, CW), s[r, c // 128]. COLS (BR == T): 128x1 tiles along R,
        written transposed -> qt (CW, RW), st[c, r // 128]. DEQ: x is fp8 and is first multiplied by
        its own 1x128 scales xs[r, c // 128]."""
        pr = tl.program_id(0)
        pc = tl.program_id(1)
        r = pr * BR + tl.arange(0, BR)
        c = pc * T + tl.arange(0, T)
        r64 = r.to(tl.int64)
        c64 = c.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * sx_r + c64[None, :], mask=(r[:, None] < R) & (c[None, :] < C),
                    other=0.0).to(tl.float32)
        if DEQ:
            xs = tl.load(xs_ptr + r64 * sxs_r + pc * sxs_c, mask=r < R, other=0.0)
            x = x * xs[:, None]
        out = (r[:, None] < RW) & (c[None, :] < CW)
        if ROWS:
            s = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4), 448.0)
            q = tl.minimum(tl.maximum(tl.div_rn(x, s[:, None]), -448.0), 448.0)
            tl.store(q_ptr + r64[:, None] * sq_r + c64[None, :], _to_e4m3(q, q_ptr.dtype.element_ty, SOFT), mask=out)
            tl.store(s_ptr + r64 * ss_r + pc * ss_c, s, mask=r < RW)
        if COLS:
            s = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-4), 448.0)
            q = tl.minimum(tl.maximum(tl.div_rn(x, s[None, :]), -448.0), 448.0)
            if TMODE == 0:
                tl.store(qt_ptr + c64[None, :] * sqt_r + r64[:, None], _to_e4m3(q, qt_ptr.dtype.element_ty, SOFT),
                         mask=out)
            else:
                tl.store(qt_ptr + c64[:, None] * sqt_r + r64[None, :],
                         _to_e4m3(tl.trans(q), qt_ptr.dtype.element_ty, SOFT),
                         mask=(c[:, None] < CW) & (r[None, :] < RW))
            tl.store(st_ptr + c64 * sst_r + pr * sst_c, s, mask=c < CW)

    @triton.jit
    def _blocks_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, NW, KW, sw_r, sq_r, ss_r, sqt_r, sst_r,
                       TRANS: tl.constexpr, T: tl.constexpr, SOFT: tl.constexpr, TMODE: tl.constexpr):
        """One 128x128 block of w (N, K) (zeros outside), outputs cover (NW, KW): q (NW, KW), s[n/128, k/128];
        TRANS: also q^T (KW, NW) and s^T[k/128, n/128]."""
        pn = tl.program_id(0)
        pk = tl.program_id(1)
        r = pn * T + tl.arange(0, T)
        c = pk * T + tl.arange(0, T)
        r64 = r.to(tl.int64)
        c64 = c.to(tl.int64)
        x = tl.load(w_ptr + r64[:, None] * sw_r + c64[None, :], mask=(r[:, None] < N) & (c[None, :] < K),
                    other=0.0).to(tl.float32)
        s = tl.div_rn(tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-4), 448.0)
        qf = tl.minimum(tl.maximum(tl.div_rn(x, s), -448.0), 448.0)
        q = _to_e4m3(qf, q_ptr.dtype.element_ty, SOFT)
        out = (r[:, None] < NW) & (c[None, :] < KW)
        tl.store(q_ptr + r64[:, None] * sq_r + c64[None, :], q, mask=out)
        tl.store(s_ptr + pn * ss_r + pk, s)
        if TRANS:
            if TMODE == 0:
                tl.store(qt_ptr + c64[None, :] * sqt_r + r64[:, None], q, mask=out)
            else:
                tl.store(qt_ptr + c64[:, None] * sqt_r + r64[None, :],
                         _to_e4m3(tl.trans(qf), qt_ptr.dtype.element_ty, SOFT),
                         mask=(c[:, None] < KW) & (r[None, :] < NW))
            tl.store(st_ptr + pk * sst_r + pn, s)


def act_operands(x2: torch.Tensor, RW: int, CW: int, outer_major: bool = True):
    """x2 (R, C) -> q fp8 (RW, CW) (zero rows/cols beyond x2), 1x128 scales (RW, ceil(CW/128)). RW=-1: R."""
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    R, C = x2.shape
    RW = R if RW < 0 else RW
    q = torch.empty(RW, CW, dtype=FP8_DTYPE, device=x2.device)
    s = _tile_scales(RW, CW, x2.device, outer_major)
    BR = TRITON_LAUNCH["rows_br"]
    _tiles_kernel[(_cdiv(RW, BR), _cdiv(CW))](
        x2, x2, q, s, q, s, R, C, RW, CW, x2.stride(0), 0, 0, q.stride(0), s.stride(0), s.stride(1), 0, 0, 0,
        DEQ=False, ROWS=True, COLS=False, BR=BR, T=BLOCK, SOFT=_SOFT_CVT["rows"], TMODE=0,
        num_warps=TRITON_LAUNCH["rows_warps"])
    return q, s


def cols_operands(x2: torch.Tensor, RW: int, CW: int, rows: bool, x_scale: torch.Tensor | None = None):
    """x2 (R, C) -> (q, s) as act_operands if `rows` (else None, None), plus 128x1 tiles along R,
    transposed: qt (CW, RW), st (CW, ceil(RW/128)) outer-major; one read of x2. x_scale: x2 is fp8 with
    these 1x128 scales and is dequantised first (the saved forward copy re-tiled for wgrad)."""
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    R, C = x2.shape
    dev = x2.device
    qt = torch.empty(CW, RW, dtype=FP8_DTYPE, device=dev)
    st = _tile_scales(CW, RW, dev, True)
    q, s = (torch.empty(RW, CW, dtype=FP8_DTYPE, device=dev), _tile_scales(RW, CW, dev, True)) if rows else (None, None)
    xs = x2 if x_scale is None else x_scale
    _tiles_kernel[(_cdiv(RW), _cdiv(CW))](
        x2, xs, qt if q is None else q, st if s is None else s, qt, st, R, C, RW, CW, x2.stride(0),
        xs.stride(0) if x_scale is not None else 0, xs.stride(1) if x_scale is not None else 0,
        0 if q is None else q.stride(0), 0 if s is None else s.stride(0), 0 if s is None else s.stride(1),
        qt.stride(0), st.stride(0), st.stride(1),
        DEQ=x_scale is not None, ROWS=rows, COLS=True, BR=BLOCK, T=BLOCK, SOFT=_SOFT_CVT["cols"],
        TMODE=TRITON_LAUNCH["cols_tmode"], num_warps=TRITON_LAUNCH["cols_warps"])
    return q, s, qt, st


def weight_operands(w: torch.Tensor, NW: int, KW: int, transposed: bool = True):
    """w (N, K) -> q (NW, KW), q^T (KW, NW) (if transposed), and the 128x128 scales as two zero-padded
    buffers: s (nb, kb4) for W and s^T (kb, nb4) for W^T (see _block_scale_buffer)."""
    w = w if w.stride(-1) == 1 else w.contiguous()
    N, K = w.shape
    nb, kb = _cdiv(NW), _cdiv(KW)
    dev = w.device
    q = torch.empty(NW, KW, dtype=FP8_DTYPE, device=dev)
    if transposed:
        s, st = _block_scale_buffer(nb, kb, dev), _block_scale_buffer(kb, nb, dev)
        qt = torch.empty(KW, NW, dtype=FP8_DTYPE, device=dev)
    else:
        s, st, qt = torch.empty(nb, kb, dtype=torch.float32, device=dev), None, None
    _blocks_kernel[(nb, kb)](w, q, s, q if qt is None else qt, s if st is None else st, N, K, NW, KW, w.stride(0),
                             q.stride(0), s.stride(0), 0 if qt is None else qt.stride(0),
                             0 if st is None else st.stride(0), TRANS=transposed, T=BLOCK,
                             SOFT=_SOFT_CVT["blocks"], TMODE=TRITON_LAUNCH["blocks_tmode"],
                             num_warps=TRITON_LAUNCH["blocks_warps"])
    if not transposed:
        return q, None, s, None
    return q, qt, s, st


# per kernel family, how fp32 -> e4m3 is done: the hardware conversion, or c10's bit arithmetic (SOFT) where the
# hardware one gave different bits on the device (seen on H100 with Triton 3.6: the transposed weight copy)
_SOFT_CVT = {"rows": False, "cols": False, "blocks": False}


@functools.lru_cache(maxsize=None)
def probe(device_index: int) -> bool:
    """True when the Triton quantisers give bit-identical results to the PyTorch ops on this GPU (checked once;
    a kernel family whose hardware fp32 -> e4m3 conversion differs switches to c10's bit arithmetic)."""
    dev = torch.device("cuda", device_index)

    def check():
        try:
            return mismatches(dev)
        except Exception as e:  # noqa: BLE001 (a Triton that cannot compile here means: use the PyTorch ops)
            return [(fam, f"{type(e).__name__}: {e}") for fam in _SOFT_CVT]

    _SOFT_CVT.update(dict.fromkeys(_SOFT_CVT, False))
    bad = check()
    if bad:
        first = "; ".join(f"{fam}: {msg}" for fam, msg in bad[:3])
        _SOFT_CVT.update(dict.fromkeys({fam for fam, _ in bad}, True))
        bad = check()
        if bad:
            _SOFT_CVT.update(dict.fromkeys(_SOFT_CVT, False))
            return _note(device_index, "triton", first + " | then: " + "; ".join(f"{f}: {m}" for f, m in bad[:3]))
        _PROBE_NOTES[(device_index, "triton_hw_cvt_mismatch")] = first
    _PROBE_NOTES[(device_index, "triton_cvt")] = ", ".join(
        f"{fam}: {'c10 bit arithmetic' if soft else 'hardware'}" for fam, soft in _SOFT_CVT.items())
    return True


def mismatches(dev: torch.device, seed: int = 0, verbose: bool = False) -> list[tuple[str, str]]:
    """Every Triton builder against its PyTorch twin on random data: (kernel family, what differs) for each
    output that is not bit-identical; [] when all are."""
    bad = []
    with torch.autocast("cuda", enabled=False):
        g = torch.Generator(device=dev).manual_seed(seed)
        for (M, K), dt in (((200, 320), torch.bfloat16), ((256, 384), torch.float32), ((130, 260), torch.float16)):
            x = torch.randn(M, K, device=dev, generator=g) * torch.logspace(-3, 3, K, device=dev)
            x[:64, :100] *= 1e-5  # E4M3 subnormals
            x[:128, 128:256] = 0  # an all-zero tile/block
            x = x.to(dt)
            Mp, Kp = _round_up(M), _round_up(K)
            want, got = _act_operands_torch(x, Mp, Kp), act_operands(x, Mp, Kp)
            want_w, got_w = _weight_operands_torch(x, Mp, Kp), weight_operands(x, Mp, Kp)
            cases = {
                ("rows", "act"): (want, got),
                ("cols", "act+cols"): (_cols_operands_torch(x, Mp, Kp, True), cols_operands(x, Mp, Kp, True)),
                ("blocks", "weight"): ((want_w[0], want_w[1], want_w[2][:, :_cdiv(Kp)], want_w[3][:, :_cdiv(Mp)]),
                           (got_w[0], got_w[1], got_w[2][:, :_cdiv(Kp)], got_w[3][:, :_cdiv(Mp)])),
                ("cols", "cols of fp8"): (_cols_operands_torch(want[0], Mp, Kp, False, want[1]),
                                          cols_operands(got[0], Mp, Kp, False, got[1])),
                ("rows", "public act"): (_quantize_activation_tiles_torch(x),
                                         act_operands(x, -1, K, outer_major=False)),
                ("blocks", "public weight"): (_quantize_weight_blocks_torch(x),
                                              weight_operands(x, M, K, False)[::2]),
            }
            for (fam, name), (a, b) in cases.items():
                for i, (u, v) in enumerate(zip(a, b)):
                    if (u is None) != (v is None) or (u is not None and not _bit_equal(u, v)):
                        msg = f"{name}[{i}] {(M, K)} {dt}"
                        if verbose and u is not None and v is not None and u.shape == v.shape:
                            uu, vv = (t.view(torch.uint8) if t.dtype == FP8_DTYPE else t for t in (u, v))
                            d = (uu != vv).nonzero()[:4].tolist()
                            msg += f": {(uu != vv).sum().item()} differ, e.g. " + ", ".join(
                                f"{ix} torch {u[tuple(ix)].float().item():.6g} ({uu[tuple(ix)].item()}) "
                                f"triton {v[tuple(ix)].float().item():.6g} ({vv[tuple(ix)].item()})" for ix in d)
                        bad.append((fam, msg))
    return bad


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == FP8_DTYPE:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return bool(torch.equal(a, b))


def use_triton(t: torch.Tensor) -> bool:
    if not (TRITON_QUANTIZE and triton is not None and t.is_cuda):
        return False
    return probe(t.device.index if t.device.index is not None else torch.cuda.current_device())
