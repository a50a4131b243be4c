"""FastDecoder: the lean decode step equals the model's absorbed forward on every config shape it accepts,
follows weight updates, and is refused (or skipped) where it does not apply."""

from __future__ import annotations

import shutil

import pytest
import torch

from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.fast_decode import FastDecoder, unsupported_reason
from nanoseek.train.common import make_optimizer
from oracle import YARN, random_model, tiny_config

VARIANTS = {
    "default": {},
    "no_q_lora_bias_yarn": dict(q_lora_rank=None, attention_bias=True, rope_scaling=YARN),
    "half_rope_softmax_v2": dict(rope_interleave=False, scoring_func="softmax", topk_method="group_limited_greedy",
                                 norm_topk_prob=False, n_shared_experts=0, first_k_dense_replace=0),
    "top1_one_group": dict(num_experts_per_tok=1, n_group=1, topk_group=1, first_k_dense_replace=2),
    # DSA: each query keeps its top-4 keys by index score once more than 4 are visible
    "dsa_top4": dict(index_topk=4),
}


def _prefilled(model, lengths, max_len=40, seed=0):
    """A cache whose rows hold prompts of the given lengths (expanded prefill, one row at a time)."""
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(len(lengths), max_len, num_layers=model.config.num_hidden_layers)
    for row, n in enumerate(lengths):
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
        model(ids, positions=torch.arange(n).unsqueeze(0), cache=cache.row_view(row), absorb=False)
    return cache


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_step_matches_absorbed_forward_logits_routing_and_cache(variant):
    model = random_model(tiny_config(**VARIANTS[variant]), seed=3)
    assert unsupported_reason(model) is None
    lengths = [5, 1, 12]  # rows at different positions: the mask and the cache writes are per row
    ref_cache, fast_cache = _prefilled(model, lengths), _prefilled(model, lengths)
    ids = torch.tensor([[7], [3], [50]])
    out = model(ids, positions=torch.tensor(lengths).unsqueeze(1), cache=ref_cache, absorb=True)
    logits, routing = FastDecoder(model)(ids, lengths, fast_cache)
    torch.testing.assert_close(logits, out.logits[:, -1], rtol=1e-4, atol=1e-4)
    assert [r.tolist() for r in routing] == [r.expert_ids[:, -1].tolist() for r in out.router]
    torch.testing.assert_close(fast_cache.latent, ref_cache.latent, rtol=1e-5, atol=1e-5)
    if model.config.use_dsa:
        torch.testing.assert_close(fast_cache.index_keys, ref_cache.index_keys, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["default", "no_q_lora_bias_yarn", "dsa_top4"])
def test_engine_greedy_and_logprobs_identical_with_and_without_fast_decode(variant):
    model = random_model(tiny_config(**VARIANTS[variant]), seed=4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    params = SamplingParams(max_tokens=10, temperature=0, return_routing=True, logprobs=True)
    runs = {}
    for fast in (True, False):
        eng = Engine(model, max_batch_size=3, max_len=32, eos_token_ids=[], fast_decode=fast)  # 4 prompts, 3 slots
        assert (eng.fast is not None) == fast
        runs[fast] = [o.outputs[0] for o in eng.generate(prompts, params)]
    for a, b in zip(runs[True], runs[False]):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.routing, b.routing)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("optimizer", ["torch_default", "make_optimizer"])
def test_weight_updates_are_picked_up(optimizer):
    """A trainer sharing the model (GRPO) steps the optimizer between rollouts: the packed copy must follow,
    also after the stages' own optimizer (torch's fused AdamW, which does not bump version counters itself)."""
    model = random_model(tiny_config(), seed=5)
    fast = FastDecoder(model)
    ids, lengths = torch.tensor([[4], [9]]), [6, 3]
    fast(ids, lengths, _prefilled(model, lengths))
    assert fast.num_packs == 1
    fast(ids, lengths, _prefilled(model, lengths))
    assert fast.num_packs == 1  # unchanged weights: no repack
    assert FastDecoder.for_model(model) is FastDecoder.for_model(model)  # engines on one model share one pack
    opt = (torch.optim.AdamW(model.parameters(), lr=0.05) if optimizer == "torch_default"
           else make_optimizer(model, lr=0.05))
    model.train()
    model(torch.randint(0, 97, (2, 8))).logits.square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        cache = _prefilled(model, lengths)
        ref = model(ids, positions=torch.tensor(lengths).unsqueeze(1), cache=cache, absorb=True).logits[:, -1]
        logits, _ = fast(ids, lengths, _prefilled(model, lengths))
    assert fast.num_packs == 2
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_an_optimizer_step_refreshes_the_packed_weights_in_place_and_a_cast_repacks():
    """After an in-place update every packed tensor (MTP block included) is rewritten where it lies, so nothing is
    allocated per GRPO step and the compiled step's flat buffer stays valid; a dtype cast packs anew."""
    model = random_model(tiny_config(num_nextn_predict_layers=1), seed=7)
    fast = FastDecoder(model)
    fast.refresh()
    ptrs = [t.data_ptr() for p in [fast, *fast.layers, *fast.mtp, fast.mtp[0].block] for t in vars(p).values()
            if isinstance(t, torch.Tensor)]
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model(torch.randint(0, 97, (2, 8))).logits.square().mean().backward()
    opt.step()
    lengths, ids = [6, 3], torch.tensor([[4], [9]])
    cache = _prefilled(model, lengths)
    cache.latent = torch.cat([cache.latent, torch.zeros_like(cache.latent[:1])])
    pos = torch.tensor(lengths).unsqueeze(1)
    with torch.no_grad():
        ref_cache = _prefilled(model, lengths)
        ref_cache.latent = torch.cat([ref_cache.latent, torch.zeros_like(ref_cache.latent[:1])])
        ref = model(ids, positions=pos, cache=ref_cache, absorb=True)
        logits, hidden, _ = fast.forward(ids, pos, cache)
        torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4)
        ref_l, _ = model.mtp_step(1, ref.hidden, ids, pos, cache=ref_cache, absorb=True)
        got_l, _ = fast.mtp_step(1, hidden, ids, pos, cache)
        torch.testing.assert_close(got_l, ref_l, rtol=1e-4, atol=1e-4)
    assert fast.num_packs == 2
    assert [t.data_ptr() for p in [fast, *fast.layers, *fast.mtp, fast.mtp[0].block] for t in vars(p).values()
            if isinstance(t, torch.Tensor)] == ptrs  # refreshed where they lie
    model.to(torch.float64)
    fast.refresh()
    assert fast.num_packs == 3 and fast.layers[0].wa.dtype == torch.float64  # a cast packs anew


@pytest.mark.parametrize("overrides", [{}, dict(q_lora_rank=40)])
@torch.no_grad()
def test_int8_weights_run_in_the_step_with_the_int8_kernel(overrides):
    """An int8 (per channel) model decodes in the fast step: the Linears' int8 rows stacked as one GEMM through
    torch's int8 weight-only kernel, as IntLinear does in the generic forward, so the two agree; a width the kernel
    cannot read (q_b_proj's 40 inputs) is dequantised once into a float pack. Greedy decoding is identical with and
    without the step."""
    from nanoseek.engine.fast_decode import _Int8
    from nanoseek.quant import quantize

    model = random_model(tiny_config(initializer_range=0.05, **overrides), seed=3)
    quantize(model, "int8")
    assert unsupported_reason(model) is None
    fast = FastDecoder(model)
    lengths = [5, 1, 12]
    ref_cache, fast_cache = _prefilled(model, lengths), _prefilled(model, lengths)
    ids = torch.tensor([[7], [3], [50]])
    out = model(ids, positions=torch.tensor(lengths).unsqueeze(1), cache=ref_cache, absorb=True)
    logits, routing = fast(ids, lengths, fast_cache)
    L = fast.layers[1]
    assert isinstance(L.wa, _Int8) and isinstance(L.w_gu, _Int8) and isinstance(L.ws_down, _Int8)
    assert isinstance(L.wq, torch.Tensor) == ("q_lora_rank" in overrides)
    torch.testing.assert_close(logits, out.logits[:, -1], rtol=1e-4, atol=1e-4)
    assert [r.tolist() for r in routing] == [r.expert_ids[:, -1].tolist() for r in out.router]
    torch.testing.assert_close(fast_cache.latent, ref_cache.latent, rtol=1e-5, atol=1e-5)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    runs = [[o.outputs[0].token_ids for o in Engine(model, max_batch_size=2, max_len=32, eos_token_ids=[],
                                                     fast_decode=f).generate(prompts, greedy)] for f in (True, False)]
    assert runs[0] == runs[1]


def test_routed_experts_padded_bmm_is_the_per_token_sum(monkeypatch):
    """Non-fp32 experts (bf16) take one zero-padded bmm each way when a quarter of them or more get tokens: checked in
    float64 (which takes that path too) against the definition, sum_k w[n, k] * expert_ids[n, k](x[n]), token by
    token. Rows of one expert at different slots, experts with no tokens and an uneven count per expert all occur."""
    from nanoseek.engine import fast_decode as fd

    g = torch.Generator().manual_seed(0)
    E, D, I, N, K = 16, 16, 12, 6, 2
    x, w = torch.randn(N, D, generator=g, dtype=torch.float64), torch.rand(N, K, generator=g, dtype=torch.float64)
    w_gu = torch.randn(E, D, 2 * I, generator=g, dtype=torch.float64)
    w_down = torch.randn(E, I, D, generator=g, dtype=torch.float64)
    ids = torch.tensor([[0, 3], [3, 5], [5, 0], [3, 1], [6, 2], [1, 15]])  # expert 3 x3, 4 and 7-14 none
    calls = []
    padded = fd._padded_experts
    monkeypatch.setattr(fd, "_padded_experts", lambda *a: calls.append(1) or padded(*a))
    want = torch.zeros(N, D, dtype=torch.float64)
    for n in range(N):
        for k in range(K):
            h = x[n] @ w_gu[ids[n, k]]
            want[n] += w[n, k] * ((torch.nn.functional.silu(h[:I]) * h[I:]) @ w_down[ids[n, k]])
    torch.testing.assert_close(fd.routed_experts(x, ids, w, w_gu, w_down), want, rtol=1e-12, atol=1e-12)
    assert calls == [1]  # 7 of 16 experts hit, 16 x 3 padded rows for 12: the padded path ran
    fd.routed_experts(x.float(), ids, w, w_gu.float(), w_down.float())  # fp32: the per-expert loop
    fd.routed_experts(x[:1], ids[:1], w[:1], w_gu, w_down)  # 2 of 16 hit: the loop
    skewed = torch.stack([torch.zeros(N, dtype=torch.long), torch.tensor([1, 4, 5, 6, 7, 9])], dim=1)
    fd.routed_experts(x, skewed, w, w_gu, w_down)  # 7 hit, but expert 0 has all 6 rows: 16 x 6 > 4 x 12 rows
    assert calls == [1]


def test_compiled_gather_path_is_bounded_by_pairs_and_bytes():
    """The compiled step gathers experts' weights for up to 2 E (token, expert) pairs and at most 16 MB in all; past
    either bound it calls the op, which reads each expert once (a large model must not copy gigabytes a step)."""
    from nanoseek.engine import fast_decode as fd
    from nanoseek.engine.fast_decode import _Int8

    small = torch.zeros(1, 256, 256).expand(16, -1, -1), torch.zeros(1, 128, 256).expand(16, -1, -1)  # 384 KB each
    assert fd._gathers(32, *small) and not fd._gathers(33, *small)  # 2 E pairs (12 MB)
    big = torch.zeros(1, 2048, 1024).expand(16, -1, -1), torch.zeros(1, 1024, 1024).expand(16, -1, -1)  # 12 MB
    assert fd._gathers(1, *big) and not fd._gathers(2, *big)  # 16 MB
    q = _Int8(torch.zeros(1, 2048, 1024, dtype=torch.int8).expand(16, -1, -1), torch.zeros(1, 2048).expand(16, -1))
    assert fd._gathers(3, q, q) and not fd._gathers(4, q, q)  # int8: 4 MB an expert and 16 KB of scales (counted)


@torch.no_grad()
def test_bf16_step_with_padded_experts_matches_the_bf16_model():
    """A bf16 model's fast step at 16 rows (every expert gets tokens: the padded bmm path) against the model's own
    absorbed forward in bf16: same routing, logits within bf16 rounding (greedy tokens are not compared: bf16
    rounding in another GEMM order flips near-ties of a random model)."""
    model = random_model(tiny_config(initializer_range=0.1), seed=5).to(torch.bfloat16)
    lengths = [3 + (7 * i) % 11 for i in range(16)]
    ref_cache, fast_cache = _prefilled(model, lengths), _prefilled(model, lengths)
    ids = torch.randint(0, 97, (16, 1), generator=torch.Generator().manual_seed(2))
    out = model(ids, positions=torch.tensor(lengths).unsqueeze(1), cache=ref_cache, absorb=True)
    fast = FastDecoder(model)
    logits, routing = fast(ids, lengths, fast_cache)
    assert len(torch.cat(routing).unique()) == model.config.n_routed_experts
    assert [r.tolist() for r in routing] == [r.expert_ids[:, -1].tolist() for r in out.router]
    # bf16 rounding in another GEMM order: max 0.05 here (logits ~0.7); a 10% error in the scores' scale gives 0.67
    assert (logits.float() - out.logits[:, -1].float()).abs().max() < 0.1


def test_unsupported_models_fall_back_or_raise():
    from nanoseek.fp8 import quantize_model_for_inference

    fp8 = random_model(tiny_config(), seed=7)
    quantize_model_for_inference(fp8)
    assert "FP8" in unsupported_reason(fp8)
    assert Engine(fp8, max_batch_size=1, max_len=16).fast is None  # auto: the generic forward
    with pytest.raises(ValueError, match="FP8"):
        Engine(fp8, max_batch_size=1, max_len=16, fast_decode=True)
    with pytest.raises(ValueError, match="FP8"):
        FastDecoder(fp8)
    mla = random_model(tiny_config(), seed=8)
    assert Engine(mla, max_batch_size=1, max_len=16, fast_decode=False).fast is None
    with pytest.raises(ValueError, match="compile=True but .*FP8"):
        Engine(fp8, max_batch_size=1, max_len=16, compile=True)
    with pytest.raises(ValueError, match="needs fast_decode"):
        Engine(mla, max_batch_size=1, max_len=16, fast_decode=False, compile=True)


def test_compiled_steps_of_many_decoders_fit_under_the_recompile_limit():
    """Every decoder's compiled graphs share one dynamo cache (one code object), and fullgraph makes reaching its
    recompile limit (8 by default) an error: the whole test suite hit it once int8 decoders compiled too. Building
    a compiled step raises the limit to at least 64 (compiling itself is exercised by the slow tests)."""
    import torch._dynamo.config as dynamo_config

    before = dynamo_config.recompile_limit
    try:
        dynamo_config.recompile_limit = 8
        FastDecoder(random_model(tiny_config(), seed=12), compile=True).compiled_run()
        assert dynamo_config.recompile_limit >= 64
    finally:
        dynamo_config.recompile_limit = max(before, dynamo_config.recompile_limit)


def test_large_models_do_not_get_a_second_copy_by_default(monkeypatch):
    import nanoseek.engine.engine as E

    mla = random_model(tiny_config(), seed=8)
    assert Engine(mla, max_batch_size=1, max_len=16).fast is not None
    monkeypatch.setattr(E, "FAST_DECODE_MAX_BYTES", 1000)  # pretend the weights are too big to copy
    assert Engine(mla, max_batch_size=1, max_len=16).fast is None
    assert Engine(mla, max_batch_size=1, max_len=16, fast_decode=True).fast is not None


def test_position_beyond_cache_is_a_clear_error():
    model = random_model(tiny_config(), seed=9)
    cache = model.new_cache(1, 8, num_layers=model.config.num_hidden_layers)
    with pytest.raises(ValueError, match="beyond the cache length 8"):
        FastDecoder(model)(torch.tensor([[1]]), [8], cache)


@pytest.mark.parametrize("variant", ["default", "no_q_lora_bias_yarn", "dsa_top4"])
@torch.no_grad()
def test_several_tokens_per_row_and_mtp_step_match_the_model(variant):
    """Speculative verification feeds T tokens per row; drafting runs the MTP modules on the same cache."""
    model = random_model(tiny_config(**VARIANTS[variant], num_nextn_predict_layers=2), seed=10)
    N = model.config.num_hidden_layers
    lengths = [4, 9]
    ref_cache, fast_cache = _prefilled(model, lengths), _prefilled(model, lengths)
    for c in (ref_cache, fast_cache):  # the prefill helper holds main layers only: give the MTP layers rows too
        c.latent = torch.cat([c.latent, torch.zeros_like(c.latent[:2])])
        if c.index_keys is not None:
            c.index_keys = torch.cat([c.index_keys, torch.zeros_like(c.index_keys[:2])])
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 3), generator=g)
    pos = torch.tensor(lengths).unsqueeze(1) + torch.arange(3)  # (2, 3): each row continues its own prefix
    out = model(ids, positions=pos, cache=ref_cache, absorb=True)
    fast = FastDecoder(model)
    logits, hidden, routing = fast.forward(ids, pos, fast_cache)
    torch.testing.assert_close(logits, out.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden, out.hidden, rtol=1e-4, atol=1e-4)
    assert [r.tolist() for r in routing] == [r.expert_ids.tolist() for r in out.router]
    for k in (1, 2):
        nxt = torch.randint(0, 97, (2, 3), generator=g)
        ref_l, ref_h = model.mtp_step(k, out.hidden, nxt, pos, cache=ref_cache, absorb=True)
        got_l, got_h = fast.mtp_step(k, out.hidden, nxt, pos, fast_cache)
        torch.testing.assert_close(got_l, ref_l, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_h, ref_h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_cache.latent, ref_cache.latent, rtol=1e-5, atol=1e-5)
    assert fast_cache.latent[N:].abs().sum() > 0  # the MTP layers' entries were written
    if model.config.use_dsa:
        torch.testing.assert_close(fast_cache.index_keys, ref_cache.index_keys, rtol=1e-5, atol=1e-5)


def test_speculative_decoding_is_the_same_with_the_fast_step():
    from nanoseek.engine import speculative_generate

    model = random_model(tiny_config(num_nextn_predict_layers=2), seed=11)
    prompt = torch.randint(0, 97, (7,), generator=torch.Generator().manual_seed(3)).tolist()
    a = speculative_generate(model, prompt, 12, fast_decode=True)
    b = speculative_generate(model, prompt, 12, fast_decode=False)
    assert a.token_ids == b.token_ids
    assert (a.num_accepted, a.num_rounds) == (b.num_accepted, b.num_rounds)


needs_cxx = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                               reason="torch.compile on CPU needs a C++ compiler")


def _compiled_matches_eager(model, comp: FastDecoder, eager: FastDecoder, ids, lengths) -> torch.Tensor:
    """One step of both decoders from equal prefilled caches: logits, routing and cache writes agree; the logits."""
    a_cache, b_cache = _prefilled(model, lengths), _prefilled(model, lengths)
    with torch.no_grad():
        a_logits, a_routing = comp(ids, lengths, a_cache)
        b_logits, b_routing = eager(ids, lengths, b_cache)
    torch.testing.assert_close(a_logits, b_logits, rtol=1e-4, atol=1e-4)
    assert [r.tolist() for r in a_routing] == [r.tolist() for r in b_routing]
    torch.testing.assert_close(a_cache.latent, b_cache.latent, rtol=1e-5, atol=1e-5)
    if a_cache.index_keys is not None:
        torch.testing.assert_close(a_cache.index_keys, b_cache.index_keys, rtol=1e-5, atol=1e-5)
    return a_logits


@needs_cxx
@pytest.mark.slow
def test_compiled_step_matches_eager_across_shapes_and_weight_updates(monkeypatch):
    """FastDecoder(compile=True) (about 40 s of compiling): logits, routing and cache writes equal the eager step for
    one and three rows (the gather path: up to 2 E token-expert pairs) and ten rows (20 pairs > 2 x 8 experts: the
    routed-experts op), at new key lengths (a dynamic-shape graph), and after an optimizer step (the compiled graph
    reads the repacked weights). The model has DSA with 8 keys a query: the first check reads 6 keys (all kept), the
    later ones up to 21 (top-8 selection)."""
    from nanoseek.engine import fast_decode as fd

    calls = []  # routed_experts runs: the eager step's (one per MoE layer) and the compiled op's
    routed = fd.routed_experts
    monkeypatch.setattr(fd, "routed_experts", lambda *a, **k: calls.append(1) or routed(*a, **k))
    model = random_model(tiny_config(index_topk=8), seed=10)
    moe_layers = sum(layer.is_moe for layer in model.model.layers[: model.config.num_hidden_layers])
    eager, comp = FastDecoder(model), FastDecoder(model, compile=True)
    assert comp.compile and not eager.compile

    def check(ids, lengths, op: bool):
        calls.clear()
        out = _compiled_matches_eager(model, comp, eager, ids, lengths)
        assert len(calls) == moe_layers * (2 if op else 1)  # the compiled step called the op, or gathered
        return out

    one, three = torch.tensor([[7]]), torch.tensor([[7], [3], [50]])
    ten = torch.tensor([[7], [3], [50], [1], [9], [22], [64], [80], [12], [33]])
    before = check(one, [5], op=False)
    check(one, [9], op=False)
    check(three, [5, 1, 12], op=False)
    check(ten, [5, 1, 12, 3, 7, 9, 2, 4, 6, 8], op=True)
    check(ten, [6, 2, 20, 4, 8, 10, 3, 5, 7, 9], op=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randint(0, 97, (2, 8))).logits.square().mean().backward()
    opt.step()
    after = check(one, [5], op=False)
    assert (after - before).abs().max() > 1e-3  # the step really changed the weights the graph reads


@needs_cxx
@pytest.mark.slow
@torch.no_grad()
def test_compiled_bf16_step_matches_the_bf16_model(monkeypatch):
    """A bf16 model through the compiled step: at 2 rows its GEMMs are fused reductions (`_reduction_mm`, traced),
    at 16 rows oneDNN GEMMs and the padded experts; both against the bf16 model's own absorbed forward (routing equal,
    logits within bf16 rounding: max 0.05 here, a 10% error in one GEMM's output gives ~0.5)."""
    from nanoseek.engine import fast_decode as fd

    traced = []
    reduction = fd._reduction_mm
    monkeypatch.setattr(fd, "_reduction_mm", lambda x, w: traced.append(x.shape[0]) or reduction(x, w))
    model = random_model(tiny_config(initializer_range=0.1), seed=5).to(torch.bfloat16)
    comp = FastDecoder(model, compile=True)
    for lengths in ([5, 1], [3 + (7 * i) % 11 for i in range(16)]):
        ref_cache, fast_cache = _prefilled(model, lengths), _prefilled(model, lengths)
        ids = torch.randint(0, 97, (len(lengths), 1), generator=torch.Generator().manual_seed(2))
        out = model(ids, positions=torch.tensor(lengths).unsqueeze(1), cache=ref_cache, absorb=True)
        logits, routing = comp(ids, lengths, fast_cache)
        assert [r.tolist() for r in routing] == [r.expert_ids[:, -1].tolist() for r in out.router]
        assert (logits.float() - out.logits[:, -1].float()).abs().max() < 0.1
    assert traced and set(traced) == {2}  # only the 2-row graph fuses its GEMMs as reductions


@needs_cxx
@pytest.mark.slow
def test_compiled_step_runs_int8_weights_as_the_eager_step():
    """An int8 (per channel) model through the compiled step: the int8 GEMMs inside the graph, the routed experts by
    the gather path (one row: int8 kernel calls per pair) and by the `routed_experts_int8` op (ten rows: 20 pairs,
    more than 2 x 8 experts), equal to the eager int8 step."""
    from nanoseek.quant import quantize

    model = random_model(tiny_config(initializer_range=0.05), seed=11)
    quantize(model, "int8")
    eager, comp = FastDecoder(model), FastDecoder(model, compile=True)
    ten = torch.tensor([[7], [3], [50], [1], [9], [22], [64], [80], [12], [33]])
    for ids, lengths in ((torch.tensor([[7]]), [5]), (ten, [5, 1, 12, 3, 7, 9, 2, 4, 6, 8])):
        _compiled_matches_eager(model, comp, eager, ids, lengths)


@needs_cxx
@pytest.mark.slow
def test_engine_with_compiled_decode_matches_the_generic_forward():
    model = random_model(tiny_config(), seed=11)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    params = SamplingParams(max_tokens=8, temperature=0, return_routing=True, logprobs=True)
    runs = {}
    for compile in (True, False):
        eng = Engine(model, max_batch_size=3, max_len=32, eos_token_ids=[], compile=compile,
                     fast_decode=None if compile else False)
        assert (eng.fast is not None) == compile and eng.compile == compile
        runs[compile] = [o.outputs[0] for o in eng.generate(prompts, params)]
    for a, b in zip(runs[True], runs[False]):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.routing, b.routing)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4)


@needs_cxx
@pytest.mark.slow
def test_speculative_decoding_with_compiled_steps_is_plain_greedy():
    from nanoseek.engine import speculative_generate

    model = random_model(tiny_config(), seed=12)
    prompt = [5, 17, 3, 60, 2]
    want = Engine(model, max_batch_size=1, max_len=40, eos_token_ids=[]).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].token_ids
    out = speculative_generate(model, prompt, 12, compile=True)
    assert out.token_ids == want and out.num_rounds > 0
    assert FastDecoder.for_model(model)._compiled_mtp is not None  # the drafts really ran compiled
    with pytest.raises(ValueError, match="needs fast_decode"):
        speculative_generate(model, prompt, 4, compile=True, fast_decode=False)


def test_quantising_in_place_after_an_engine_ran_rebuilds_the_shared_step():
    """The model's shared FastDecoder was packed from the float weights; quantise(model, "int8") replaces those
    parameters, and the next Engine's step holds the int8 packs (it kept decoding with the old float weights) and
    greedy-decodes as the generic forward of the quantised model does."""
    from nanoseek.engine.fast_decode import _Int8
    from nanoseek.quant import quantize

    model = random_model(tiny_config(initializer_range=0.05), seed=3)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    first = Engine(model, max_batch_size=2, max_len=32, eos_token_ids=[])
    first.generate(prompts, greedy)
    quantize(model, "int8")
    engine = Engine(model, max_batch_size=2, max_len=32, eos_token_ids=[])
    assert engine.fast is not first.fast and engine.fast.int8
    got = [o.outputs[0].token_ids for o in engine.generate(prompts, greedy)]
    assert isinstance(engine.fast.layers[1].wa, _Int8)
    want = [o.outputs[0].token_ids for o in Engine(model, max_batch_size=2, max_len=32, eos_token_ids=[],
                                                   fast_decode=False).generate(prompts, greedy)]
    assert got == want
