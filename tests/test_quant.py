"""Weight-only quantisation (nanoseek.quant): error bounds, logits against fp32, exact save/load round trips,
transformers loading the bf16 and FP8 folders, and errors that name the bad value."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from nanoseek import quant
from nanoseek.quant import (FORMATS, IntLinear, QuantizedExperts, dequantize_int, load_for_inference, load_quantized,
                            pack_int4, quantize, quantize_int, save_quantized, state_bytes, unpack_int4)
from oracle import random_model, tiny_config


def _logits(model, x, forced=None):
    with torch.no_grad():
        return model(x, forced_expert_ids=forced).logits.float()


@pytest.mark.parametrize("bits,group", [(8, None), (8, 128), (4, 128), (4, 32)])
def test_int_dequantised_weights_within_half_a_quantisation_step(bits, group):
    torch.manual_seed(0)
    w = torch.randn(64, 300) * 0.05
    w[3, 7] = 4.0  # an outlier: only its own row (per channel) or group gets a coarse scale
    q, s = quantize_int(w, bits, group)
    d = dequantize_int(q, s, bits, group, w.shape[1])
    g = w.shape[1] if group is None else group
    step = s.repeat_interleave(g, dim=1)[:, : w.shape[1]]  # (N, K): the scale each element was quantised with
    qmax = 2 ** (bits - 1) - 1
    torch.testing.assert_close(s, torch.stack([c.abs().amax(1) for c in w.split(g, dim=1)], 1) / qmax)
    err = (w - d).abs()
    assert (err <= step / 2 * (1 + 1e-6) + 1e-12).all()  # the analytic bound of round-to-nearest: half a step
    assert err.max() > 0 and (d != 0).any()  # quantised, not copied
    if group is None:  # per channel: the outlier's row is coarse, every other row keeps its own fine scale
        assert err[3].max() > 10 * err[torch.arange(64) != 3].max()


def test_int4_packs_two_values_per_byte_and_unpacks_exactly():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 1)[:, :15]  # odd width: a padded last byte
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 8)
    assert torch.equal(unpack_int4(p, 15), q)


def test_all_zero_rows_quantise_to_zeros_with_finite_scales():
    q, s = quantize_int(torch.zeros(4, 256), 8, 128)
    assert torch.isfinite(s).all() and not q.any()


def _w8a16_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What bf16 activations and a bf16-rounded sum may cost against x @ w^T in fp32: x rounded (relative 2^-9)
    and the sum rounded (2^-9), so |error| <= 2^-8 (|x| @ |w|^T), with a little room for fp32 accumulation."""
    return 1.05 * 2.0 ** -8 * (x.abs() @ w.abs().t()) + 1e-6


@pytest.mark.parametrize("K", [16, 96, 256])
def test_int8_kernel_path_matches_the_dequantised_reference_within_bf16_rounding(K):
    """int8 per channel on CPU runs torch's int8 weight-only kernel on bf16 activations, scales applied in fp32: within
    the bf16 rounding bound of the dequantised fp32 reference, not exactly it (the weights were rounded too)."""
    torch.manual_seed(K)
    lin = nn.Linear(K, 40, bias=True)
    ql = IntLinear.from_linear(lin, 8, None)
    x = torch.randn(3, 5, K)
    w = ql.dequantized_weight()
    ref = nn.functional.linear(x, w, ql.bias)
    err = (ql(x) - ref).abs()
    assert (err <= _w8a16_bound(x, w)).all() and err.max() > 0  # bf16 rounding, not the fp32 reference
    assert ql(x).dtype == torch.float32 and (ql(x) - lin(x)).abs().max() > 0  # the weights were rounded
    xb = x.bfloat16()
    assert ql(xb).dtype == torch.bfloat16


@pytest.mark.parametrize("K", [24, 40, 100])
def test_int8_widths_the_kernel_cannot_read_take_the_dequantised_path_exactly(K):
    """The bf16 kernel reads 16 columns at a time: at other widths it crashed or returned garbage (torch 2.13), so
    those layers dequantise, and match the fp32 reference to rounding."""
    lin = nn.Linear(K, 24, bias=False)
    ql = IntLinear.from_linear(lin, 8, None)
    x = torch.randn(4, K)
    torch.testing.assert_close(ql(x), x @ ql.dequantized_weight().t(), rtol=1e-5, atol=1e-5)


def test_int8_experts_run_the_kernel_per_expert_within_bf16_rounding():
    """QuantizedExperts at int8 per channel: each expert's rows through the int8 kernel, against the experts'
    dequantised weights in fp32."""
    torch.manual_seed(0)
    qe = QuantizedExperts(4, 32, 16, "int8")
    for name in ("gate_up_proj", "down_proj"):
        getattr(qe, name).data = torch.randint(-127, 128, getattr(qe, name).shape, dtype=torch.int8)
        getattr(qe, name + "_scale").data = torch.rand(getattr(qe, name + "_scale").shape) / 100
    counts = [3, 0, 5, 2]
    x = torch.randn(sum(counts), 32)
    out = qe.grouped(x, "gate_up_proj", counts)
    rows = [x[a:a + c] for a, c in zip([0, 3, 3, 8], counts)]
    ws = [qe.expert_weight("gate_up_proj", e) for e in range(4)]
    ref = torch.cat([r @ w.t() for r, w, c in zip(rows, ws, counts) if c])
    bound = torch.cat([_w8a16_bound(r, w) for r, w, c in zip(rows, ws, counts) if c])
    assert out.shape == (10, 32) and ((out - ref).abs() <= bound).all() and (out - ref).abs().max() > 0


# relative logit error of a 3-layer random model: about 2-3x the relative weight error each format gives
# (bf16 2^-9, int8 ~0.3%, e4m3 ~3%, int4 with 128-groups ~12%) compounded over the layers
TOL = {"fp32": 0.0, "bf16": 0.02, "int8": 0.04, "int8-g128": 0.04, "fp8": 0.15, "int4-g128": 0.6}


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantised_logits_close_to_fp32(fmt):
    model = random_model(tiny_config(hidden_size=128, moe_intermediate_size=64, initializer_range=0.05), seed=3)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        out = model(x)
    ref, routing = out.logits, out.expert_ids  # replayed below: a flipped top-k choice is not a rounding error
    names = quantize(model, fmt)
    got = _logits(model, x, routing)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel <= TOL[fmt], (fmt, rel)
    if fmt != "fp32":
        assert rel > 0 and any(".experts" in n for n in names) and any("q_a_proj" in n for n in names)
    if fmt not in ("fp32", "bf16"):  # bf16 is the whole model in bf16
        assert not any(n.endswith(("lm_head", "embed_tokens", ".gate")) for n in names)  # kept in high precision
    if fmt.startswith("int") or fmt == "fp8":
        assert isinstance(model.model.layers[1].mlp.experts, QuantizedExperts)
        assert model.config.quantization_config is not None


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantise_save_load_round_trips_exactly(tmp_path, fmt):
    model = random_model(tiny_config(), seed=5)  # with an MTP layer, group-limited routing, ragged 128-blocks
    quantize(model, fmt)
    x = torch.randint(0, model.config.vocab_size, (2, 10))
    save_quantized(model, tmp_path)
    back = load_quantized(tmp_path, dtype=torch.bfloat16 if fmt == "bf16" else torch.float32)
    assert quant.model_format(back) == fmt
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        ya, yb = model(x, mtp=True), back(x, mtp=True)
    assert torch.equal(ya.logits, yb.logits) and torch.equal(ya.mtp_logits[0], yb.mtp_logits[0])
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("q_b_proj.weight")}
    want = {"fp32": "F32", "bf16": "BF16", "int8": "I8", "int8-g128": "I8", "int4-g128": "U8", "fp8": "F8_E4M3"}
    assert dtypes == {want[fmt]}
    assert load_for_inference(tmp_path, fmt if fmt in ("bf16", "fp8") else None).config.n_routed_experts == 8


def test_quantised_bytes_in_memory_shrink_by_format():
    sizes = {}
    for fmt in ("fp32", "bf16", "int8", "int4-g128"):
        m = random_model(tiny_config(hidden_size=128, moe_intermediate_size=64), seed=1)
        quantize(m, fmt)
        sizes[fmt] = state_bytes(m)
    assert sizes["fp32"] > sizes["bf16"] > sizes["int8"] > sizes["int4-g128"]
    biases = 3 * 8 * 4  # 2 MoE layers + the MTP layer keep their (8,) selection bias in fp32
    assert sizes["bf16"] * 2 == sizes["fp32"] + biases


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_bf16_and_fp8_folders_load_in_transformers(tmp_path, fmt):
    import transformers

    # every dim a multiple of 128 or at most 128: transformers' CPU FP8 dequantisation derives the block size from
    # the scale grid, which is wrong for ragged edge blocks (see test_checkpoint.py)
    cfg = tiny_config(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128,
                      kv_lora_rank=96, num_attention_heads=2, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
                      num_nextn_predict_layers=0)
    model = random_model(cfg, seed=7)
    quantize(model, fmt)
    save_quantized(model, tmp_path)
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    own = load_for_inference(tmp_path)  # nanoseek reads the same folder into fp32
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert (ref(x).logits - own(x).logits).abs().max() < 1e-4


def test_engine_decodes_a_quantised_model_with_the_generic_forward():
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.engine.fast_decode import unsupported_reason

    model = random_model(tiny_config(num_nextn_predict_layers=0), seed=9)
    quantize(model, "int8-g128")
    assert "quantised" in unsupported_reason(model)  # the packed fast step would read int8 codes as weights
    prompt = [5, 17, 3, 44]
    out = Engine(model, max_batch_size=2, max_len=32).generate([prompt], SamplingParams(max_tokens=6, temperature=0,
                                                                                      ignore_eos=True))
    ids = list(prompt)
    for _ in range(6):  # greedy through the plain full forward
        ids.append(int(_logits(model, torch.tensor([ids]))[0, -1].argmax()))
    assert out[0].outputs[0].token_ids == ids[len(prompt):]


def test_unknown_format_is_an_error_naming_the_value(tmp_path):
    from nanoseek.train.evaluate import EvalConfig

    model = random_model(tiny_config(), seed=2)
    with pytest.raises(ValueError, match="'int3'"):
        quantize(model, "int3")
    with pytest.raises(ValueError, match="'int3'"):
        EvalConfig(quantize="int3")
    quantize(model, "int8")
    with pytest.raises(ValueError, match="already quantised to int8"):
        quantize(model, "int4-g128")
    save_quantized(model, tmp_path)
    with pytest.raises(ValueError, match="holds int8 weights.*int4-g128"):
        load_for_inference(tmp_path, "int4-g128")


def test_convert_cli_writes_a_folder_that_loads_back(tmp_path):
    from nanoseek.cli import main

    model = random_model(tiny_config(num_nextn_predict_layers=0), seed=4)
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "q"), "--quantize", "int4-g128"]) == 0
    back = load_for_inference(tmp_path / "q")
    assert quant.model_format(back) == "int4-g128"
    quantize(model, "int4-g128")
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.equal(_logits(model, x), _logits(back, x))
    with pytest.raises(SystemExit):  # argparse names the bad choice
        main(["convert", str(tmp_path / "src"), str(tmp_path / "bad"), "--quantize", "int2"])


@pytest.mark.parametrize("preset,index", [("deepseek-v3", 0), ("deepseek-v3.2", 128)])
def test_kv_cache_bytes_per_token_is_the_latent_arithmetic(preset, index):
    """61 layers x (kv_lora_rank 512 + qk_rope_head_dim 64 [+ DSA indexer key 128]) values x bytes per value; the
    DeepSeek FP8 layout: 512 e4m3 + 4 fp32 scales + 64 bf16 = 656 bytes a layer (FlashMLA), the indexer key
    128 e4m3 + 1 fp32 scale = 132."""
    from nanoseek import ModelConfig

    cfg = ModelConfig.from_preset(preset)
    assert (cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim) == (61, 512, 64)
    kv = quant.kv_cache_bytes_per_token(cfg)
    values = 61 * (512 + 64 + index)
    assert kv == {"fp32": 4 * values, "bf16": 2 * values, "fp8": values,
                  "fp8-deepseek": 61 * (656 + (132 if index else 0))}
    assert quant.kv_cache_bytes_per_token(cfg, num_layers=62)["bf16"] == 2 * 62 * (512 + 64 + index)


@pytest.mark.parametrize("dsa", [False, True])
def test_kv_cache_bytes_match_what_the_engine_allocates_and_info_prints(dsa, tmp_path, capsys):
    """The arithmetic equals the engine's LatentCache (latent + rope key, DSA indexer keys) in fp32 and bf16, and
    `nanoseek info --model DIR` prints it for a model folder."""
    from nanoseek import cli
    from nanoseek.engine import Engine

    model = random_model(tiny_config(**({"index_topk": 4} if dsa else {})), seed=0)
    cfg = model.config
    kv = quant.kv_cache_bytes_per_token(cfg)
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if dsa else 0)
    assert kv["fp32"] == 4 * cfg.num_hidden_layers * per_layer
    assert Engine(model, max_batch_size=2, max_len=8).cache.bytes_per_token() == kv["fp32"]
    assert Engine(model, max_batch_size=2, max_len=8, dtype=torch.bfloat16).cache.bytes_per_token() == kv["bf16"]
    model.to(torch.float32).save_pretrained(tmp_path / "m")
    assert cli.main(["info", "--model", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("KV cache bytes/token"))
    assert f"fp32 {kv['fp32']:,}  bf16 {kv['bf16']:,}  fp8 {kv['fp8']:,}  fp8-deepseek {kv['fp8-deepseek']:,}" in line
    assert ("indexer key" in out) == dsa and "weight bytes" in out
