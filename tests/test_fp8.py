"""FP8 block quantisation, the V3 FP8 training GEMM (reference path; the Hopper fast path and the Triton
quantisers where a GPU is present), and FP8-weight inference layers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek import fp8, fp8_triton
from nanoseek.fp8 import (
    FP8_MAX,
    FP8Linear,
    QuantizedLinear,
    convert_to_fp8_training,
    dequantize_activation_tiles,
    dequantize_weight_blocks,
    fp8_backend_info,
    fp8_linear,
    fp8_supported_fast_path,
    quantize_activation_tiles,
    quantize_model_for_inference,
    quantize_weight_blocks,
)

FP8 = torch.float8_e4m3fn


def e4m3_bound(x, scale_elem):
    """|x - dq(q(x))| bound: half an ulp of 3 mantissa bits (2^-4 relative) for normals, half the
    subnormal spacing 2^-9 (in units of the block scale) for the smallest values."""
    return 2.0 ** -4 * x.abs() * (1 + 1e-5) + 2.0 ** -10 * scale_elem + 1e-12


def expand_blocks(s, shape, block=128):
    return s.repeat_interleave(block, 0).repeat_interleave(block, 1)[: shape[0], : shape[1]]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------- weight blocks
@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (1, 5), (129, 257)])
def test_weight_block_round_trip_within_e4m3_bound(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # columns of very different magnitude
    q, s = quantize_weight_blocks(w)
    assert q.dtype == FP8 and q.shape == w.shape
    assert s.dtype == torch.float32 and list(s.shape) == [-(-shape[0] // 128), -(-shape[1] // 128)]
    dq = dequantize_weight_blocks(q, s)
    assert dq.shape == w.shape and dq.dtype == torch.float32
    err = (dq - w).abs()
    assert (err <= e4m3_bound(w, expand_blocks(s, shape))).all()
    assert err.max() > 0  # something was actually rounded
    # each block's amax maps onto 448: scale = amax / 448
    amax = F.pad(w.abs(), (0, s.shape[1] * 128 - shape[1], 0, s.shape[0] * 128 - shape[0]))
    amax = amax.view(s.shape[0], 128, s.shape[1], 128).amax(dim=(1, 3))
    torch.testing.assert_close(s, amax / FP8_MAX)


def test_all_zero_block_gives_finite_scale_and_zeros():
    w = torch.randn(256, 256)
    w[:128, 128:] = 0
    q, s = quantize_weight_blocks(w)
    assert torch.isfinite(s).all() and s[0, 1] == pytest.approx(1e-4 / FP8_MAX)
    dq = dequantize_weight_blocks(q, s)
    assert (dq[:128, 128:] == 0).all() and not torch.isnan(q.float()).any()


def test_outlier_only_affects_its_own_block():
    torch.manual_seed(1)
    w = torch.randn(256, 300)
    q0, s0 = quantize_weight_blocks(w)
    w[5, 7] = 1e4
    q1, s1 = quantize_weight_blocks(w)
    assert s1[0, 0] == pytest.approx(1e4 / FP8_MAX)
    others = torch.ones_like(s0, dtype=torch.bool)
    others[0, 0] = False
    assert torch.equal(s0[others], s1[others])
    same = ~expand_blocks((~others).float(), w.shape).bool()
    assert torch.equal(q0.float()[same], q1.float()[same])
    # the outlier's block loses its small values (flushed towards 0), the others keep full accuracy
    dq = dequantize_weight_blocks(q1, s1)
    assert rel(dq[128:], w[128:]) < 0.04 and rel(dq[:128, 128:], w[:128, 128:]) < 0.04


def test_ue8m0_scales_are_powers_of_two_and_cover_the_block():
    torch.manual_seed(2)
    w = torch.randn(300, 200) * 3.7
    q, s = quantize_weight_blocks(w, scale_fmt="ue8m0")
    e = torch.log2(s)
    assert torch.equal(e, e.round())
    amax = (w.abs().amax() / FP8_MAX).item()
    assert (s <= 2 * quantize_weight_blocks(w)[1]).all()  # rounded up by less than 2x
    assert (s >= quantize_weight_blocks(w)[1]).all() and s.max() >= amax
    assert not torch.isnan(q.float()).any() and q.float().abs().max() <= FP8_MAX
    dq = dequantize_weight_blocks(q, s)
    assert ((dq - w).abs() <= e4m3_bound(w, expand_blocks(s, w.shape))).all()
    with pytest.raises(ValueError, match="scale_fmt"):
        quantize_weight_blocks(w, scale_fmt="e8m0")


def test_wrong_scale_shape_is_a_value_error_naming_both_shapes():
    q, s = quantize_weight_blocks(torch.randn(300, 200))
    with pytest.raises(ValueError, match=r"\[3, 2\].*\[2, 3\]"):
        dequantize_weight_blocks(q, s.t().contiguous())
    with pytest.raises(ValueError, match=r"\[3, 2\]"):
        dequantize_weight_blocks(q, s[:2])


def test_dequantize_to_bf16_rounds_once_from_fp32():
    q, s = quantize_weight_blocks(torch.randn(129, 257))
    assert torch.equal(dequantize_weight_blocks(q, s, dtype=torch.bfloat16),
                       dequantize_weight_blocks(q, s).bfloat16())


# ---------------------------------------------------------------------------------------------- activation tiles
def test_activation_tiles_shape_and_round_trip():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 300) * torch.logspace(-2, 2, 300)
    q, s = quantize_activation_tiles(x)
    assert q.dtype == FP8 and q.shape == x.shape and list(s.shape) == [2, 5, 3]
    torch.testing.assert_close(s[1, 2, 2], x[1, 2, 256:].abs().max() / FP8_MAX)
    dq = dequantize_activation_tiles(q, s)
    s_elem = s.repeat_interleave(128, -1)[..., :300]
    assert ((dq - x).abs() <= e4m3_bound(x, s_elem)).all()
    with pytest.raises(ValueError, match=r"\[2, 5, 3\]"):
        dequantize_activation_tiles(q, s[..., :2])


# ---------------------------------------------------------------------------------------------- fp8_linear
def _linear_problem(seed=4, M=(4, 33), K=300, N=200):
    torch.manual_seed(seed)
    x = torch.randn(*M, K, requires_grad=True)
    w = (torch.randn(N, K) / K ** 0.5).requires_grad_()
    b = torch.randn(N).requires_grad_()
    g = torch.randn(*M, N)
    return x, w, b, g


def test_fp8_linear_forward_close_to_fp32_but_quantised():
    x, w, b, _ = _linear_problem()
    y = fp8_linear(x, w, b)
    ref = F.linear(x, w, b)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel(y, ref) < 0.05 and not torch.equal(y, ref)
    # exactly the V3 numerics: 1x128 activation tiles times 128x128 weight blocks, fp32 accumulation
    xq = dequantize_activation_tiles(*quantize_activation_tiles(x.detach()))
    wq = dequantize_weight_blocks(*quantize_weight_blocks(w.detach()))
    torch.testing.assert_close(y, F.linear(xq, wq, b), rtol=1e-5, atol=1e-5)


def test_fp8_linear_backward_close_to_fp32_reference():
    x, w, b, g = _linear_problem()
    (fp8_linear(x, w, b) * g).sum().backward()
    got = (x.grad, w.grad, b.grad)
    x.grad = w.grad = b.grad = None
    (F.linear(x, w, b) * g).sum().backward()
    for a, r in zip(got, (x.grad, w.grad, b.grad)):
        assert a.shape == r.shape and a.dtype == r.dtype
        assert rel(a, r) < 0.08
    assert not torch.equal(got[0], x.grad) and not torch.equal(got[1], w.grad)


def test_fp8_linear_wgrad_tiles_along_tokens():
    """wgrad = dq(q(g^T)) @ dq(q(x_hat^T))^T with 1x128 tiles along the token dim, x_hat = the saved fp8 x."""
    x, w, b, g = _linear_problem(M=(300,))
    (fp8_linear(x, w, b) * g).sum().backward()
    x_hat = dequantize_activation_tiles(*quantize_activation_tiles(x.detach()))
    xt = dequantize_activation_tiles(*quantize_activation_tiles(x_hat.t()))
    gt = dequantize_activation_tiles(*quantize_activation_tiles(g.t()))
    torch.testing.assert_close(w.grad, gt @ xt.t(), rtol=1e-5, atol=1e-5)
    gq = dequantize_activation_tiles(*quantize_activation_tiles(g))
    wq = dequantize_weight_blocks(*quantize_weight_blocks(w.detach()))
    torch.testing.assert_close(x.grad, gq @ wq, rtol=1e-5, atol=1e-5)


def test_fp8_linear_grads_vanish_where_grad_out_is_zero():
    x, w, b, g = _linear_problem()
    g[1] = 0  # a whole sequence: its input grads must be exactly zero
    g[..., 10:20] = 0  # some output channels: their weight rows and bias entries get no gradient
    (fp8_linear(x, w, b) * g).sum().backward()
    assert (x.grad[1] == 0).all() and (x.grad[0] != 0).any()
    assert (w.grad[10:20] == 0).all() and (b.grad[10:20] == 0).all() and (w.grad[:10] != 0).any()
    x.grad = w.grad = b.grad = None
    fp8_linear(x, w, b).mul(0).sum().backward()
    assert all((t == 0).all() for t in (x.grad, w.grad, b.grad))


def test_fp8_linear_saves_only_fp8_copies_for_backward():
    x, w, b, _ = _linear_problem()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fp8_linear(x, w, b)
    big = [t for t in saved if t.numel() >= min(x.numel(), w.numel())]
    assert len(big) == 2 and all(t.dtype == FP8 for t in big)  # x and W as fp8, nothing in fp32
    fp32_bytes = (x.numel() + w.numel()) * 4
    assert sum(t.numel() * t.element_size() for t in saved) < fp32_bytes / 3  # 1 B/element + small scales


def test_fp8_linear_keeps_input_and_master_dtypes():
    x, w, b, _ = _linear_problem()
    xb = x.detach().bfloat16().requires_grad_()
    y = fp8_linear(xb, w, b)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert not fp8_supported_fast_path("cpu")  # CPU tensors: the reference path is the one tested here
    with pytest.raises(ValueError, match="fast path"):
        fp8_linear(x, w, b, use_fast_path=True)


def test_fp8_linear_under_autocast_returns_the_autocast_dtype():
    x, w, b, _ = _linear_problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w, b)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(y, fp8_linear(x.detach(), w.detach(), b.detach()).bfloat16())  # fp32 GEMM, one rounding


def _emulated_scaled_mm_nt(a_q, a_s, b_q, b_s, b_blocks, out_dtype):
    """CPU stand-in for the blockwise cuBLAS GEMM, reading the scales in the layout it is handed."""
    M, K = a_q.shape
    assert M % 128 == 0 and K % 128 == 0 and b_q.shape[0] % 128 == 0 and b_q.shape[1] == K
    assert a_s.shape == (M, K // 128) and a_s.stride() == (1, M)  # 1x128 scales outer-dim-major
    if b_blocks:  # the zeroed (N/128, K/128 rounded up to 4) buffer
        assert b_s.is_contiguous() and b_s.shape == (b_q.shape[0] // 128, -(-K // 512) * 4)
        b = dequantize_weight_blocks(b_q, b_s[:, : K // 128])
    else:
        assert b_s.shape == (b_q.shape[0], K // 128) and b_s.stride() == (1, b_q.shape[0])
        b = dequantize_activation_tiles(b_q, b_s)
    return (dequantize_activation_tiles(a_q, a_s) @ b.t()).to(out_dtype)


@pytest.mark.parametrize("M,K,N", [(256, 512, 384), (200, 320, 512), (300, 200, 130)])
def test_fast_path_operands_padding_and_layouts_on_cpu(monkeypatch, M, K, N):
    """The fast path's padded operands and scale layouts, with the GEMM emulated: same result as the reference."""
    monkeypatch.setattr(fp8, "_scaled_mm_nt", _emulated_scaled_mm_nt)
    torch.manual_seed(9)
    x, w, g = torch.randn(M, K), torch.randn(N, K) * 0.1, torch.randn(M, N)
    res = {}
    for fast in (True, False):
        y, saved = fp8._fp8_forward(x, w, fast, torch.float32)
        res[fast] = (y, *fp8._fp8_backward(g, saved, K, fast, True, True, torch.float32, torch.float32))
    for a, r in zip(res[True], res[False]):
        assert a.shape == r.shape
        # same FP8 operands, fp32 sums over padded vs unpadded shapes (a different summation order): a wrong
        # padding or scale layout is off by O(1), rounding by ~1e-5 of O(10) sums
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)


def test_block_scale_buffer_is_contiguous_for_transposed_scales():
    """Regression: F.pad(s.t(), (0, 0)) keeps the transposed strides, so the dgrad scales reached cuBLAS
    in the wrong order whenever N/128 was a multiple of 4."""
    s = torch.randn(4, 8)
    buf = fp8._mm_block_buffer(s.t())
    assert buf.is_contiguous() and buf.shape == (8, 4) and torch.equal(buf, s.t())
    buf = fp8._mm_block_buffer(torch.randn(3, 5))
    assert buf.is_contiguous() and buf.shape == (3, 8) and (buf[:, 5:] == 0).all()


def test_scale_is_a_correctly_rounded_division_by_448():
    amax = torch.rand(4096) * 100
    s = fp8._scale_from_amax(amax, None)
    assert torch.equal(s, (amax.double().clamp(min=1e-4) / 448).float())


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not fp8_supported_fast_path(), reason="needs a Hopper GPU with blockwise scaled_mm")
@pytest.mark.parametrize("M,K,N", [(256, 512, 384), (200, 320, 512), (132, 300, 200), (1024, 1024, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hopper_fast_path_matches_reference_path(M, K, N, dtype):
    x, w, b, g = (t.detach().cuda() for t in _linear_problem(M=(M,), K=K, N=N))
    x, g = x.to(dtype), g.to(dtype)
    out = {}
    for fast in (True, False):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        y = fp8_linear(xi, wi, bi, use_fast_path=fast)
        (y * g).sum().backward()
        out[fast] = (y, xi.grad, wi.grad, bi.grad)
    for a, r in zip(out[True], out[False]):
        assert a.dtype == r.dtype and a.shape == r.shape
        assert rel(a.float(), r.float()) < 1e-2
    if dtype == torch.float32:  # same FP8 operands; only the accumulation differs (cuBLAS's FP8 tensor-core
        for a, r in zip(out[True][:3], out[False][:3]):  # accumulation measured ~1.3e-4 off exact fp32 on H100)
            assert rel(a, r) < 1e-3


@pytest.mark.skipif(not fp8_supported_fast_path(), reason="needs a Hopper GPU with blockwise scaled_mm")
def test_hopper_fast_path_under_autocast_and_in_a_module():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128)).cuda()
    convert_to_fp8_training(model)
    x = torch.randn(4, 64, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16 and model[0].weight.grad.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    ql = QuantizedLinear.from_linear(nn.Linear(256, 384).cuda())
    xb = x.bfloat16()
    assert rel(ql(xb).float(), F.linear(xb, ql.dequantized_weight(torch.bfloat16), ql.bias.bfloat16()).float()) < 0.05


@pytest.mark.skipif(not (CUDA and fp8_triton.triton is not None), reason="needs CUDA and Triton")
@pytest.mark.parametrize("seed", [0, 1])
def test_triton_quantisers_are_bit_identical_to_pytorch_on_gpu(seed):
    assert fp8_backend_info()["triton_quantize"], fp8_backend_info()["notes"]
    assert fp8_triton.mismatches(torch.device("cuda"), seed=seed + 1, verbose=True) == []
    torch.manual_seed(seed)
    for (M, K), dt in (((200, 320), torch.bfloat16), ((1024, 2048), torch.float32), ((128, 130), torch.float32),
                       ((3, 7), torch.bfloat16), ((513, 384), torch.float16)):
        x = (torch.randn(M, K, device="cuda") * torch.logspace(-4, 4, K, device="cuda")).to(dt)
        x[: M // 2, : K // 3] *= 1e-6  # values that land on E4M3 subnormals
        if M >= 128 and K >= 256:
            x[:128, 128:256] = 0  # an all-zero tile and block
        Mp, Kp = -(-M // 128) * 128, -(-K // 128) * 128
        pairs = [
            (fp8._act_operands_torch(x, Mp, Kp), fp8_triton.act_operands(x, Mp, Kp)),
            (fp8._cols_operands_torch(x, Mp, Kp, True), fp8_triton.cols_operands(x, Mp, Kp, True)),
            (fp8._weight_operands_torch(x, Mp, Kp), fp8_triton.weight_operands(x, Mp, Kp)),
            (fp8._quantize_activation_tiles_torch(x), quantize_activation_tiles(x)),
            (fp8._quantize_weight_blocks_torch(x), quantize_weight_blocks(x)),
        ]
        qa, sa = pairs[0][0]
        pairs.append((fp8._cols_operands_torch(qa, Mp, Kp, False, sa),
                      fp8_triton.cols_operands(qa, Mp, Kp, False, sa)))
        for want, got in pairs:
            for a, b in zip(want, got):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.shape == b.shape and a.dtype == b.dtype
                    if a.dtype == FP8:
                        a, b = a.view(torch.uint8), b.view(torch.uint8)
                    assert torch.equal(a, b), (M, K, dt)


# ---------------------------------------------------------------------------------------------- FP8Linear
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 160)
        self.foo = nn.Module()
        self.foo.q_proj = nn.Linear(160, 144)  # ragged 128-blocks on purpose
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(144, 4, bias=False)
        self.mlp.up_proj = nn.Linear(144, 96, bias=False)
        self.lm_head = nn.Linear(96, 10, bias=False)
        self.norm = nn.LayerNorm(96)

    def forward(self, x):
        return self.lm_head(self.norm(self.mlp.up_proj(torch.relu(self.foo.q_proj(x)))))


def test_convert_to_fp8_training_swaps_only_the_right_linears_and_trains():
    torch.manual_seed(5)
    model = Toy()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # built BEFORE the conversion
    names = convert_to_fp8_training(model)
    assert names == ["foo.q_proj", "mlp.up_proj"]
    assert isinstance(model.foo.q_proj, FP8Linear) and isinstance(model.mlp.up_proj, FP8Linear)
    assert type(model.lm_head) is nn.Linear and type(model.mlp.gate) is nn.Linear
    assert isinstance(model.embed_tokens, nn.Embedding)
    assert all(p is params[n] for n, p in model.named_parameters()) and list(model.state_dict()) == keys
    assert convert_to_fp8_training(model) == []  # idempotent

    x, target = torch.randn(32, 160), torch.randn(32, 10)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert model.foo.q_proj.weight.dtype == torch.float32  # master weights stay fp32


# ---------------------------------------------------------------------------------------------- QuantizedLinear
def test_quantized_linear_from_linear_matches_dequantised_and_original():
    torch.manual_seed(6)
    lin = nn.Linear(300, 200)
    ql = QuantizedLinear.from_linear(lin)
    assert ql.weight.dtype == FP8 and not ql.weight.requires_grad
    assert ql.weight_scale_inv.dtype == torch.float32 and list(ql.weight_scale_inv.shape) == [2, 3]
    assert set(ql.state_dict()) == {"weight", "weight_scale_inv", "bias"}
    x = torch.randn(3, 7, 300)
    w_hat = ql.dequantized_weight(torch.float32)
    assert torch.equal(ql(x), F.linear(x, w_hat, lin.bias.detach()))
    err = (w_hat - lin.weight.detach()).abs()
    assert (err <= e4m3_bound(lin.weight.detach(), expand_blocks(ql.weight_scale_inv, (200, 300)))).all()
    with torch.no_grad():
        assert rel(ql(x), lin(x)) < 0.05
    assert ql.dequantized_weight().dtype == torch.float32  # compute_dtype follows the source Linear
    ql.compute_dtype = torch.bfloat16
    assert ql.dequantized_weight().dtype == torch.bfloat16
    assert set(QuantizedLinear(8, 4).state_dict()) == {"weight", "weight_scale_inv"}


def test_quantized_linear_loads_a_quantize_weight_blocks_state_dict():
    torch.manual_seed(7)
    w, b = torch.randn(129, 257), torch.randn(129)
    q, s = quantize_weight_blocks(w, scale_fmt="ue8m0")
    ql = QuantizedLinear(257, 129, bias=True, compute_dtype=torch.float32)
    ql.load_state_dict({"weight": q, "weight_scale_inv": s, "bias": b})
    x = torch.randn(5, 257)
    assert torch.equal(ql(x), F.linear(x, dequantize_weight_blocks(q, s), b))
    # model.to(dtype) must not recast the fp8 weight or its fp32 scales (checkpoint loading relies on it)
    ql.to(torch.bfloat16)
    assert ql.weight.dtype == FP8 and torch.equal(ql.weight.float(), q.float())
    assert ql.weight_scale_inv.dtype == torch.float32 and torch.equal(ql.weight_scale_inv, s)
    assert ql.bias.dtype == torch.bfloat16 and ql.compute_dtype == torch.bfloat16
    assert ql(x.bfloat16()).dtype == torch.bfloat16


def test_quantize_model_for_inference_skips_heads_and_works_on_meta():
    torch.manual_seed(8)
    model = Toy()
    names = quantize_model_for_inference(model)
    assert names == ["foo.q_proj", "mlp.up_proj"]
    assert isinstance(model.foo.q_proj, QuantizedLinear) and type(model.lm_head) is nn.Linear
    assert "foo.q_proj.weight_scale_inv" in model.state_dict()
    assert model(torch.randn(2, 160)).shape == (2, 10)
    with torch.device("meta"):
        meta = Toy()
        quantize_model_for_inference(meta, skip=lambda name, m: name != "mlp.up_proj")
    meta.to_empty(device="cpu")
    meta.to(torch.bfloat16)
    assert meta.mlp.up_proj.weight.dtype == FP8 and meta.mlp.up_proj.weight_scale_inv.dtype == torch.float32
    src = {k: v for k, v in model.state_dict().items() if k.startswith("mlp.up_proj.")}
    meta.mlp.up_proj.load_state_dict({k.removeprefix("mlp.up_proj."): v for k, v in src.items()})
    assert torch.equal(meta.mlp.up_proj.weight.float(), model.mlp.up_proj.weight.float())
    x = torch.randn(2, 144)
    assert torch.equal(meta.mlp.up_proj(x), model.mlp.up_proj(x))


# ---------------------------------------------------------------------------------------------- MLA's kv_b_proj
def test_fp8_training_runs_kv_b_proj_through_the_fp8_gemm_in_the_expanded_form(monkeypatch):
    """V3 recipe: every Linear GEMM in FP8, MLA's up-projection kv_b_proj (W_UK ; W_UV) included. The expanded
    (training / prefill) form multiplies the latent c by it like any Linear, so it must be the FP8 GEMM (1x128
    tiles of c, 128x128 blocks of W). The absorbed (decode) form folds the weight into the query and the output;
    there it stays high precision, as in DeepSeek's inference/model.py."""
    from oracle import random_model, tiny_config

    model = random_model(tiny_config(), seed=21)
    convert_to_fp8_training(model)
    real, calls = fp8.fp8_linear, []

    def spy(x, weight, bias=None, use_fast_path=None):
        y = real(x, weight, bias, use_fast_path)
        calls.append((weight, x.detach(), y.detach()))
        return y

    monkeypatch.setattr(fp8, "fp8_linear", spy)
    attns = [m for m in model.modules() if hasattr(m, "kv_b_proj")]  # 3 layers and the MTP block
    assert len(attns) == 4 and all(isinstance(a.kv_b_proj, FP8Linear) for a in attns)
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(x, mtp=True)
    (out.logits.sum() + out.mtp_logits[0].sum()).backward()
    for a in attns:
        w = a.kv_b_proj.weight
        hits = [(xi, yi) for wi, xi, yi in calls if wi is w]
        assert len(hits) == 1
        c, y = hits[0]
        assert c.shape[-1] == a.R and y.shape[-1] == w.shape[0]
        # the emulated V3 GEMM: quantise -> dequantise both operands, fp32 product
        qx, sx = quantize_activation_tiles(c)
        qw, sw = quantize_weight_blocks(w.detach())
        emulated = dequantize_activation_tiles(qx, sx) @ dequantize_weight_blocks(qw, sw).t()
        torch.testing.assert_close(y, emulated, rtol=1e-6, atol=1e-6)
        assert (y - c @ w.detach().t()).abs().max() > 1e-4  # not the full-precision product
        assert w.grad is not None and w.grad.abs().sum() > 0  # the FP8 backward reaches the master weight

    calls.clear()
    with torch.no_grad():
        model(x, absorb=True)
    assert not any(wi is a.kv_b_proj.weight for a in attns for wi, _, _ in calls)  # absorbed: dense weight
    assert any(wi is attns[0].q_b_proj.weight for wi, _, _ in calls)  # ... while the other Linears stay FP8
