"""The engine's batch-level shortcuts give what the one-at-a-time paths give. Batched prefill: the prompts admitted
together go through one forward (rows right-padded, written into scattered cache slots through `rows_view`): the
same sampled tokens, log-probs, routing and prompt routing, for the MLA/MoE, DSA and dense models. `generate`
without a callback decodes each text once, at the end: the same texts and stops as the incremental decode."""

from __future__ import annotations

import pytest
import torch

from nanoseek.engine import Engine, SamplingParams
from nanoseek.model.dense import DenseConfig, DenseModel
from oracle import random_model, tiny_config

V = 97


def _models():
    torch.manual_seed(3)
    dense = DenseModel(DenseConfig.from_preset("student-tiny", vocab_size=V, eos_token_id=1))
    return {"mla": random_model(tiny_config(), seed=1), "dsa": random_model(tiny_config(index_topk=4), seed=2),
            "dense": dense}


MODELS = _models()


def _run(model, prompts, batched: bool, params: SamplingParams):
    engine = Engine(model, max_batch_size=16, max_len=64)
    calls = []
    if batched:
        real = engine._prefill_batch
        engine._prefill_batch = lambda seqs: calls.append(len(seqs)) or real(seqs)
    else:  # the reference: one forward per prompt
        engine._prefill_batch = lambda seqs: [engine._prefill(q.slot, q.handle.prompt_ids, 0, q.params.return_routing)
                                              for q in seqs]
    outs = engine.generate(prompts, [params] * len(prompts))
    return outs, calls, engine.num_forwards


@pytest.mark.parametrize("name", ["mla", "dsa", "dense"])
def test_batched_prefill_samples_what_one_prefill_per_prompt_samples(name):
    model = MODELS[name]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, V, (n,), generator=g).tolist() for n in (5, 11, 3, 8)]  # different lengths
    params = SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=7, logprobs=True, ignore_eos=True,
                            return_routing=name != "dense")
    got, calls, n_fwd = _run(model, prompts, True, params)
    want, _, n_fwd_ref = _run(model, prompts, False, params)
    assert calls == [4]  # all four prompts in one forward
    assert n_fwd == n_fwd_ref - 3
    for a, b in zip(got, want):
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids
            assert max(abs(x - y) for x, y in zip(ca.logprobs, cb.logprobs)) < 1e-5
            if name != "dense":
                assert torch.equal(ca.routing, cb.routing)
                assert torch.equal(ca.prompt_routing, cb.prompt_routing)
                assert ca.prompt_routing.shape[0] == len(a.prompt_ids)


def test_a_reused_prefix_falls_back_to_one_prefill_per_prompt():
    """Prompts admitted after earlier requests finished can reuse a slot's cached prefix: those take the
    one-prompt path (chunked from the reused position), and the answers stay the greedy ones."""
    model = MODELS["mla"]
    engine = Engine(model, max_batch_size=2, max_len=64)
    calls = []
    real = engine._prefill_batch
    engine._prefill_batch = lambda seqs: calls.append(len(seqs)) or real(seqs)
    base, greedy = [5, 6, 7, 8, 9], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    first = engine.generate([base + [10], base + [11]], greedy)
    again = engine.generate([base + [12], base + [10]], greedy)
    assert calls == [2]  # the second admission reused the cached prefix: no batched prefill
    fresh = Engine(model, max_batch_size=2, max_len=64).generate([base + [10]], greedy)
    assert again[1].outputs[0].token_ids == first[0].outputs[0].token_ids == fresh[0].outputs[0].token_ids



@pytest.mark.parametrize("name", ["mla", "dense"])
def test_an_admission_draws_every_groups_first_token_at_once_as_each_prompt_alone_would(name):
    """Four prompts with n = 3 admitted together: their 12 first tokens come from one sampling call, and every
    sample (first token and the rest) is the one that prompt gets when generated alone."""
    model = MODELS[name]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, V, (n,), generator=g).tolist() for n in (6, 9, 4, 7)]
    params = SamplingParams(max_tokens=5, temperature=1.0, n=3, seed=11, logprobs=True, ignore_eos=True,
                            return_routing=name != "dense")
    engine = Engine(model, max_batch_size=12, max_len=64)
    draws = []
    real = engine._sample_and_append
    engine._sample_and_append = lambda seqs, logits, routing: draws.append(len(seqs)) or real(seqs, logits, routing)
    together = engine.generate(prompts, params)
    assert draws[0] == 12  # one draw for the whole admission, not one per prompt
    for prompt, got in zip(prompts, together):
        alone = Engine(model, max_batch_size=3, max_len=64).generate([prompt], params)[0]
        for a, b in zip(got.outputs, alone.outputs):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
            if name != "dense":
                assert torch.equal(a.routing, b.routing)

class CountingTokenizer:
    """Digits as text, one character per token; counts decode calls."""

    eos_id = eos_token_id = 1

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        return [2 + int(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        self.calls += 1
        return "".join(str(i % 10) for i in ids)


def test_generate_without_a_callback_decodes_each_text_once_with_the_same_results():
    model = MODELS["mla"]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, V, (n,), generator=g).tolist() for n in (4, 7)]
    runs = {}
    for stop in (None, ["5"]):
        params = SamplingParams(max_tokens=12, temperature=1.0, n=2, seed=3, ignore_eos=True, stop=stop)
        for quiet in (True, False):
            tok = CountingTokenizer()
            engine = Engine(model, tok, max_batch_size=8, max_len=64)
            deltas = []
            outs = engine.generate(prompts, params, callback=None if quiet else deltas.append)
            runs[stop is None, quiet] = ([[(c.text, c.token_ids, c.finish_reason) for c in o.outputs] for o in outs],
                                         tok.calls)
            if not quiet:  # the streamed deltas add up to the final texts
                for i, o in enumerate(outs):
                    for j, c in enumerate(o.outputs):
                        assert "".join(e.text_delta for e in deltas if (e.request_index, e.sample_index) == (i, j)) \
                            == c.text
    for no_stop in (True, False):
        assert runs[no_stop, True][0] == runs[no_stop, False][0]
    assert runs[True, True][1] == 4  # one decode per sample
    assert runs[True, False][1] > 4 * 8  # incremental: about two a step
    assert runs[False, True][1] > 4 * 3  # stop strings are still checked at every step
    assert any(c[2] == "stop" for o in runs[False, True][0] for c in o)


class _Recorder:
    """Stands in for the engine's FastDecoder and records the (rows, tokens) of every call it forwards."""

    def __init__(self, fast):
        self.fast, self.decode_rows, self.prefill_rows = fast, [], []

    def __call__(self, ids, positions, cache, compiled=None):
        self.decode_rows.append(ids.shape[0])
        return self.fast(ids, positions, cache, compiled=compiled)

    def forward(self, ids, positions, cache, **kw):
        self.prefill_rows.append(ids.shape[0])
        return self.fast.forward(ids, positions, cache, **kw)

    def __getattr__(self, name):
        return getattr(self.fast, name)


@pytest.mark.parametrize("fast", [True, False])
def test_a_decode_step_runs_only_the_running_rows_once_samples_finish(fast):
    """Samples of different lengths in slots 0-3: once the short ones finish, a decode step's batch is the running
    rows alone (a rows_view of the cache), not every row up to the highest running slot, in the fast step and in
    the generic forward; every sample is still the one its prompt gets alone."""
    model = MODELS["mla"]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, V, (n,), generator=g).tolist() for n in (4, 7, 5, 6)]
    lengths = [2, 8, 1, 6]  # slot 2 ends with its first token, slot 0 after two: holes below slots 1 and 3
    params = [SamplingParams(max_tokens=m, temperature=1.0, seed=20 + i, logprobs=True, ignore_eos=True,
                             return_routing=True) for i, m in enumerate(lengths)]
    engine = Engine(model, max_batch_size=4, max_len=64, fast_decode=fast)
    rows = []
    if fast:
        engine.fast = _Recorder(engine.fast)
    else:
        model.register_forward_pre_hook(lambda m, a, kw: rows.append(a[0].shape[0]) if a[0].shape[1] == 1 else None,
                                        with_kwargs=True)
    try:
        together = engine.generate(prompts, params)
    finally:
        model._forward_pre_hooks.clear()
    running = [sum(m > t for m in lengths) for t in range(1, max(lengths))]  # rows still running at each step
    assert running == [3, 2, 2, 2, 2, 1, 1]
    assert (engine.fast.decode_rows if fast else rows) == running  # was 4, 4, 4, 4, 4, 2, 2
    for prompt, p, got in zip(prompts, params, together):
        alone = Engine(model, max_batch_size=1, max_len=64, fast_decode=fast).generate([prompt], p)[0].outputs[0]
        assert got.outputs[0].token_ids == alone.token_ids
        assert max(abs(x - y) for x, y in zip(got.outputs[0].logprobs, alone.logprobs)) < 1e-5
        assert torch.equal(got.outputs[0].routing, alone.routing)


def test_the_batched_prefill_runs_through_the_fast_step():
    """With a fast step the admitted prompts are prefilled by it (T tokens a row, a third of the generic forward's
    operators), the generic forward runs no prefill; test_batched_prefill_samples_what_one_prefill_per_prompt_samples
    checks that it samples what the generic prefill of each prompt alone samples."""
    model = MODELS["mla"]
    engine = Engine(model, max_batch_size=6, max_len=64)
    engine.fast = _Recorder(engine.fast)
    generic = []
    model.register_forward_pre_hook(lambda m, a, kw: generic.append(a[0].shape), with_kwargs=True)
    try:
        engine.generate([[3, 4, 5], [6, 7, 8, 9, 10], [11, 12]], SamplingParams(max_tokens=3, n=2, seed=1))
    finally:
        model._forward_pre_hooks.clear()
    assert engine.fast.prefill_rows == [3] and generic == []


def test_reset_starts_over_and_refuses_requests_in_flight():
    """Engine.reset: a fresh cache of the new size, no cached prefix (the next prompt is prefilled whole), the
    model back in eval mode; with a request still queued it raises instead of dropping it."""
    model = MODELS["mla"]
    engine = Engine(model, max_batch_size=2, max_len=32)
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    want = engine.generate([[5, 6, 7, 8]], greedy)[0].outputs[0].token_ids
    model.train()
    engine.reset(max_batch_size=3, max_len=40)
    assert not model.training and engine.cache.latent.shape[1:3] == (3, 40) and engine.num_prefill_tokens == 0
    assert engine.generate([[5, 6, 7, 8]], greedy)[0].outputs[0].token_ids == want
    assert engine.num_prefill_tokens == 4  # the whole prompt again: nothing kept from before the reset
    engine.add_request([1, 2, 3], greedy)
    with pytest.raises(RuntimeError, match="in flight"):
        engine.reset()
    with pytest.raises(RuntimeError, match="in flight"):
        engine.release_cache()
