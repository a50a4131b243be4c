"""Generation engine: cache vs recompute, absorbed vs expanded, batching, sampling, stops, streaming, MTP
speculative decoding. Tiny random models (init 0.2, random norms) so argmax and routing are sensitive."""

from __future__ import annotations

import threading

import pytest
import torch

from nanoseek import LatentCache
from nanoseek.engine import Engine, SamplingParams, process_logits, speculative_generate, token_logprobs
from oracle import random_model, tiny_config

V = 97


@pytest.fixture(scope="module")
def mla():
    return random_model(tiny_config(), seed=1)


@pytest.fixture(scope="module")
def dsa():
    return random_model(tiny_config(index_topk=4), seed=2)


@pytest.fixture(scope="module", params=["mla", "dsa"])
def model(request, mla, dsa):
    return mla if request.param == "mla" else dsa


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def recompute_greedy(model, prompt, n):
    """Greedy by a full no-cache forward over the whole sequence at every step."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, **kw)


class CharTokenizer:
    """Token i <-> letter chr(97 + i % 26): enough for stop strings and streaming text."""

    eos_token_id = None

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)

    def encode(self, text):
        return [ord(c) - 97 for c in text]


# ------------------------------------------------------------------ cache correctness
def test_cached_greedy_matches_recompute_with_mixed_prompt_lengths(model):
    prompts = prompts_of([2, 7, 4, 11])  # DSA: prompt + 8 new tokens > index_topk = 4
    eng = Engine(model, max_batch_size=4, max_len=32, eos_token_ids=[])
    outs = eng.generate(prompts, greedy(8))
    for p, o in zip(prompts, outs):
        assert o.prompt_ids == p
        assert o.outputs[0].token_ids == recompute_greedy(model, p, 8)
        assert o.outputs[0].finish_reason == "length"


@torch.no_grad()
def test_absorbed_decode_logits_match_expanded_prefill(model):
    ids = torch.tensor(prompts_of([14], seed=3))  # (1, 14)
    full = model(ids).logits  # expanded, no cache
    cache = LatentCache(model.config, 1, 16)
    pos = torch.arange(14).unsqueeze(0)
    model(ids[:, :5], positions=pos[:, :5], cache=cache, absorb=False)
    for t in range(5, 14):
        step = model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache, absorb=True).logits
        torch.testing.assert_close(step[0, 0], full[0, t], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_matches_one_shot(model):
    prompts = prompts_of([13, 6])
    params = greedy(6, logprobs=True)
    one = Engine(model, max_batch_size=2, max_len=32, eos_token_ids=[], prefill_chunk=None).generate(prompts, params)
    eng = Engine(model, max_batch_size=2, max_len=32, eos_token_ids=[], prefill_chunk=3)
    chunked = eng.generate(prompts, params)
    assert eng.num_forwards > 6 + 2  # several prefill forwards really ran
    for a, b in zip(one, chunked):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs),
                                   atol=1e-5, rtol=0)


def test_second_turn_prefills_only_new_tokens_and_matches_recompute(model):
    eng = Engine(model, max_batch_size=1, max_len=48, eos_token_ids=[])
    first = prompts_of([6], seed=4)[0]
    reply = eng.generate([first], greedy(5))[0].outputs[0].token_ids
    second = first + reply + prompts_of([4], seed=5)[0]
    before = eng.num_prefill_tokens
    out = eng.generate([second], greedy(7))[0].outputs[0].token_ids
    assert eng.num_prefill_tokens - before == 5  # 6 + 4 cached (reply's last token was never fed) -> 5 new
    assert out == recompute_greedy(model, second, 7)


def test_idle_row_keeps_its_prefix_for_a_later_turn(mla):
    eng = Engine(mla, max_batch_size=2, max_len=48, eos_token_ids=[])
    first, other = prompts_of([6, 3], seed=6)
    outs = eng.generate([first, other], [greedy(5), greedy(16)])  # slot 0 idles while slot 1 runs on
    assert outs[1].outputs[0].token_ids == recompute_greedy(mla, other, 16)
    second = first + outs[0].outputs[0].token_ids + [7, 8, 9]
    before = eng.num_prefill_tokens
    out = eng.generate([second], greedy(6))[0].outputs[0].token_ids
    assert eng.num_prefill_tokens - before < len(second)  # part of the idle row's prefix was reused
    assert out == recompute_greedy(mla, second, 6)


def test_more_prompts_than_slots_match_each_prompt_alone(mla):
    prompts = prompts_of([3, 8, 5, 2, 9])
    lens = [4, 9, 3, 7, 5]  # different lengths so slots free at different steps
    params = [greedy(n) for n in lens]
    batched = Engine(mla, max_batch_size=2, max_len=32, eos_token_ids=[]).generate(prompts, params)
    alone = Engine(mla, max_batch_size=1, max_len=32, eos_token_ids=[])
    for p, pa, o in zip(prompts, params, batched):
        assert o.outputs[0].token_ids == alone.generate([p], pa)[0].outputs[0].token_ids
        assert len(o.outputs[0].token_ids) == pa.max_tokens


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9, top_k=5),
                                dict(temperature=0.0)], ids=["t1", "t0.7-p0.9-k5", "greedy"])
@torch.no_grad()
def test_logprobs_match_full_forward(model, kw):
    params = SamplingParams(max_tokens=8, seed=11, logprobs=True, **kw)
    prompts = prompts_of([5, 3])
    outs = Engine(model, max_batch_size=2, max_len=32, eos_token_ids=[]).generate(prompts, params)
    for p, o in zip(prompts, outs):
        gen = o.outputs[0].token_ids
        logits = model(torch.tensor([p + gen])).logits[0, len(p) - 1:-1]  # (L, V): logits that produced gen
        want = token_logprobs(logits, torch.tensor(gen), params)
        if kw["temperature"] == 0:
            want2 = logits.log_softmax(-1).gather(1, torch.tensor(gen).unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(want, want2)
        torch.testing.assert_close(torch.tensor(o.outputs[0].logprobs), want, atol=1e-4, rtol=0)
        assert all(lp <= 0 for lp in o.outputs[0].logprobs)


def test_top_k_top_p_keep_the_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    for top_p, size in [(0.8, 2), (0.81, 3), (0.01, 1), (1.0, 4)]:
        logp, support = process_logits(logits, [SamplingParams(top_p=top_p)])
        assert support.sum().item() == size
        assert torch.isclose(logp[support].exp().sum(), torch.tensor(1.0))
    logp, support = process_logits(logits, [SamplingParams(top_k=3, top_p=0.9)])  # 0.5/.95, .3/.95 < .9: 3 kept
    assert support[0].tolist() == [True, True, True, False]
    logp, support = process_logits(logits, [SamplingParams(temperature=0)])
    assert support[0].tolist() == [True, False, False, False]
    torch.testing.assert_close(logp, logits.log_softmax(-1))


def test_sampler_draws_from_the_final_distribution_with_one_number_per_row_and_step():
    """Each sampled row takes exactly one number of its own stream per step (inverse CDF over the processed
    distribution); 20,000 draws match that distribution (chi-square), tokens cut by top-k / top-p / min-p never
    appear, and a stream's numbers depend on its key and position only."""
    from nanoseek.engine.sampling import SampleStream, make_generator, sample

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -9.0, 1.5, 0.2])
    params = [SamplingParams(temperature=0.8, top_k=6, top_p=0.95)] * 400
    logp, support = process_logits(logits.expand(400, -1), params)
    streams = [make_generator(k) for k in range(400)]
    counts = torch.zeros(8)
    for _ in range(50):
        counts += torch.bincount(sample(logits.expand(400, -1), params, streams).tokens, minlength=8)
    assert all(s.drawn == 50 for s in streams)
    p = logp[0].exp()
    assert counts[~support[0]].sum() == 0 and support[0].sum() < 8
    kept = support[0]
    chi2 = ((counts[kept] - 20000 * p[kept]) ** 2 / (20000 * p[kept])).sum()
    assert chi2 < 20.5, (counts, 20000 * p)  # 99.9% point of chi-square with <= 5 degrees of freedom
    a, b = SampleStream(7), SampleStream(7)
    xs = [a.uniform() for _ in range(2000)]
    assert xs == [b.uniform() for _ in range(2000)] and all(0 < x <= 1 for x in xs)
    ys = [SampleStream(k).uniform() for k in range(1, 2001)]  # first numbers of neighbouring keys
    assert abs(sum(xs) / 2000 - 0.5) < 0.02 and abs(sum(ys) / len(ys) - 0.5) < 0.02
    assert abs(torch.corrcoef(torch.tensor([xs, ys]))[0, 1]) < 0.1


def test_seeded_request_samples_the_same_alone_or_batched(mla):
    target = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=1234)
    prompt = prompts_of([4], seed=7)[0]
    alone = Engine(mla, max_batch_size=1, max_len=32, eos_token_ids=[]).generate([prompt], target)
    others = prompts_of([6, 2, 9], seed=8)
    eng = Engine(mla, max_batch_size=4, max_len=32, eos_token_ids=[])
    mixed = eng.generate(others[:2] + [prompt] + others[2:],
                         [SamplingParams(max_tokens=5, seed=1), greedy(12), target, SamplingParams(max_tokens=3)])
    assert mixed[2].outputs[0].token_ids == alone[0].outputs[0].token_ids
    n3_params = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=1234, n=3)
    n3 = eng.generate([prompt], n3_params)[0]
    assert n3.outputs[0].token_ids == alone[0].outputs[0].token_ids  # sample 0 of n is the n = 1 request
    # one slot: every sample prefilled on its own; four slots: samples 1, 2 decoded from copied cache rows
    one_slot = Engine(mla, max_batch_size=1, max_len=32, eos_token_ids=[]).generate([prompt], n3_params)[0]
    assert [c.token_ids for c in one_slot.outputs] == [c.token_ids for c in n3.outputs]
    assert len({tuple(c.token_ids) for c in n3.outputs}) == 3  # n samples of one seed: independent streams


def test_a_seed_gives_different_prompts_and_samples_their_own_streams(mla, monkeypatch):
    """Sample i of a seeded request draws from derive_seed(seed, i, *prompt): with a flat distribution (logits
    zeroed) the tokens are a pure function of the random draws, so shared streams would give equal tokens."""
    import nanoseek.engine.engine as eng

    real = eng.sample
    monkeypatch.setattr(eng, "sample", lambda logits, *a, **k: real(torch.zeros_like(logits), *a, **k))
    prompts = prompts_of([4, 5, 4], seed=20)
    params = SamplingParams(max_tokens=6, seed=7, n=2)
    outs = Engine(mla, max_batch_size=6, max_len=32, eos_token_ids=[]).generate(prompts, params)
    samples = [tuple(c.token_ids) for o in outs for c in o.outputs]
    assert len(set(samples)) == 6  # 6 x 6 draws from a flat 97-way distribution: shared streams would repeat
    for i in range(2):
        firsts = [o.outputs[i].token_ids[:3] for o in outs]
        assert firsts[0] != firsts[1] != firsts[2] != firsts[0]
    # the same prompt and seed again: the same samples, whatever its position in the call
    again = Engine(mla, max_batch_size=2, max_len=32, eos_token_ids=[]).generate(prompts[::-1], params)
    assert [tuple(c.token_ids) for c in again[0].outputs] == samples[4:]


def test_sampling_mask_holds_token_and_routing_matches_full_forward(model):
    params = SamplingParams(max_tokens=7, temperature=1.0, top_k=5, seed=3, return_sampling_mask=True,
                            return_routing=True)
    prompts = prompts_of([4, 6], seed=9)
    outs = Engine(model, max_batch_size=2, max_len=32, eos_token_ids=[]).generate(prompts, params)
    cfg = model.config
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        L = len(c.token_ids)
        assert c.sampling_masks.shape == (L, V) and c.sampling_masks.dtype == torch.bool
        assert c.sampling_masks.sum(-1).tolist() == [5] * L
        assert all(c.sampling_masks[i, t] for i, t in enumerate(c.token_ids))
        assert c.routing.shape == (L, cfg.num_moe_layers, cfg.num_experts_per_tok)
        with torch.no_grad():
            router = model(torch.tensor([p + c.token_ids])).router
        want = torch.stack([r.expert_ids[0, len(p) - 1:len(p) - 1 + L] for r in router], dim=1)  # (L, layers, K)
        assert torch.equal(c.routing.sort(-1).values, want.sort(-1).values)
        # the prefill's routing of every prompt position (keep routing replays the whole sequence)
        want_prompt = torch.stack([r.expert_ids[0, :len(p)] for r in router], dim=1)
        assert c.prompt_routing.shape == (len(p), cfg.num_moe_layers, cfg.num_experts_per_tok)
        assert torch.equal(c.prompt_routing.sort(-1).values, want_prompt.sort(-1).values)


def test_prompt_routing_covers_a_prefix_the_cache_could_reuse(model):
    """A request asking for routing prefills its whole prompt, even when a free slot holds its prefix."""
    eng = Engine(model, max_batch_size=1, max_len=40, eos_token_ids=[])
    first = prompts_of([6], seed=21)[0]
    eng.generate([first], greedy(3))
    second = first + prompts_of([3], seed=22)[0]
    before = eng.num_prefill_tokens
    c = eng.generate([second], SamplingParams(max_tokens=2, temperature=0, return_routing=True))[0].outputs[0]
    assert eng.num_prefill_tokens - before == len(second)  # no prefix reuse with routing asked for
    with torch.no_grad():
        router = model(torch.tensor([second])).router
    want = torch.stack([r.expert_ids[0] for r in router], dim=1)
    assert torch.equal(c.prompt_routing.sort(-1).values, want.sort(-1).values)
    before = eng.num_prefill_tokens
    eng.generate([second + [1]], greedy(2))
    assert eng.num_prefill_tokens - before < len(second)  # without it the prefix is reused as before


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                         ("max_tokens", 0), ("n", 0)])
def test_bad_sampling_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


# ------------------------------------------------------------------ stops and streaming
def test_stop_strings_stop_token_ids_and_length(mla):
    tok = CharTokenizer()
    eng = Engine(mla, tokenizer=tok, max_batch_size=2, max_len=40, eos_token_ids=[])
    prompt = prompts_of([5], seed=10)[0]
    base = eng.generate([prompt], greedy(12))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 12 and base.text == tok.decode(base.token_ids)
    stop = base.text[5:7]
    cut = base.text.find(stop)
    o = eng.generate([prompt], greedy(12, stop=[stop]))[0].outputs[0]
    assert o.finish_reason == "stop" and o.text == base.text[:cut]
    assert o.token_ids == base.token_ids[:cut + 2]  # the tokens that completed the stop string are kept
    t = base.token_ids[4]
    o = eng.generate([prompt], greedy(12, stop_token_ids=[t]))[0].outputs[0]
    first = base.token_ids.index(t)
    assert o.finish_reason == "stop" and o.token_ids == base.token_ids[:first + 1]  # stop token kept
    assert o.text == base.text[:first]  # but not in the text
    eos = Engine(mla, tokenizer=tok, max_batch_size=1, max_len=40, eos_token_ids=[t])
    assert eos.generate([prompt], greedy(12))[0].outputs[0].token_ids == base.token_ids[:first + 1]
    assert eos.generate([prompt], greedy(12, ignore_eos=True))[0].outputs[0].token_ids == base.token_ids


def test_stream_events_reassemble_the_outputs(mla):
    tok = CharTokenizer()
    eng = Engine(mla, tokenizer=tok, max_batch_size=2, max_len=40, eos_token_ids=[])
    prompts = prompts_of([3, 5, 4], seed=12)
    ref = eng.generate(prompts, greedy(9))
    stop = ref[1].outputs[0].text[3:5]
    params = [greedy(9), greedy(9, stop=[stop]), greedy(6)]
    stream = eng.stream(prompts, params)
    toks, text, done = {}, {}, {}
    for ev in stream:
        assert not done.get(ev.request_index), "event after finish"
        toks.setdefault(ev.request_index, []).append(ev.token_id)
        text[ev.request_index] = text.get(ev.request_index, "") + ev.text_delta
        done[ev.request_index] = ev.finished
    outs = stream.outputs
    for i, o in enumerate(outs):
        assert done[i] and toks[i] == o.outputs[0].token_ids and text[i] == o.outputs[0].text
    assert outs[1].outputs[0].finish_reason == "stop" and stop not in text[1]
    assert outs[2].outputs[0].token_ids == ref[2].outputs[0].token_ids[:6]
    assert eng.generate(["bca"], greedy(2))[0].prompt_ids == [1, 2, 0]  # string prompts go through the tokenizer


def test_requests_added_from_threads_share_the_batch(mla):
    eng = Engine(mla, max_batch_size=3, max_len=32, eos_token_ids=[])
    prompts = prompts_of([3, 6, 2, 5, 4], seed=13)
    stop = threading.Event()
    loop = threading.Thread(target=eng.run_forever, args=(stop,), daemon=True)
    loop.start()
    handles = [None] * len(prompts)

    def client(i):
        handles[i] = eng.add_request(prompts[i], greedy(6))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        results = [h.result(timeout=30) for h in handles]
    finally:
        stop.set()
        loop.join(timeout=10)
    for p, h, r in zip(prompts, handles, results):
        assert r.outputs[0].token_ids == recompute_greedy(mla, p, 6)
        events = [h.events.get_nowait() for _ in range(h.events.qsize())]
        assert [e.token_id for e in events] == r.outputs[0].token_ids and events[-1].finished


def test_cancelled_request_aborts_and_frees_its_slot(mla):
    eng = Engine(mla, max_batch_size=1, max_len=32, eos_token_ids=[])
    h1 = eng.add_request([1, 2, 3], greedy(20))
    h2 = eng.add_request([4, 5], greedy(3))
    eng.step()
    h1.cancel()
    while eng.has_unfinished():
        eng.step()
    assert h1.result(0).outputs[0].finish_reason == "abort" and len(h1.result(0).outputs[0].token_ids) == 1
    assert h2.result(0).outputs[0].token_ids == recompute_greedy(mla, [4, 5], 3)


# ------------------------------------------------------------------ speculative decoding
def with_oracle_drafts(model, reference: list[int], every: int = 3):
    """Wrap model.mtp_step so module k's last-position draft is the reference token (except every `every`-th
    position), exercising the accept / bonus / reject paths; records the module's own argmax drafts."""
    real = type(model).mtp_step.__get__(model)
    seen = []

    def step(k, h_prev, next_ids, positions, cache=None, absorb=False):
        logits, h = real(k, h_prev, next_ids, positions, cache=cache, absorb=absorb)
        p = int(positions[0, -1]) + k + 1  # the position this draft is for
        seen.append((k, p, int(logits[0, -1].argmax())))
        if p < len(reference) and p % every:
            logits = logits.clone()
            logits[0, -1] = -1e9
            logits[0, -1, reference[p]] = 0.0
        return logits, h

    model.mtp_step = step
    return seen


@pytest.mark.parametrize("variant", ["mla", "dsa", "mla-2-drafts"])
def test_speculative_greedy_equals_plain_greedy(variant, mla, dsa):
    model = {"mla": mla, "dsa": dsa}.get(variant) or random_model(tiny_config(num_nextn_predict_layers=2), seed=5)
    eng = Engine(model, max_batch_size=1, max_len=40, eos_token_ids=[])
    for p in prompts_of([1, 4, 9], seed=14):
        want = eng.generate([p], greedy(12))[0].outputs[0].token_ids
        out = speculative_generate(model, p, 12)
        assert out.token_ids == want and out.finish_reason == "length"
        assert 0.0 <= out.acceptance_rate <= 1.0
        assert out.num_main_forwards == 1 + out.num_rounds <= 12
        seen = with_oracle_drafts(model, p + want)
        try:  # the oracle wraps model.mtp_step, which only the generic path calls
            hit = speculative_generate(model, p, 12, fast_decode=False)
        finally:
            del model.mtp_step
        assert hit.token_ids == want
        assert hit.acceptance_rate > 0.3 and hit.num_rounds < out.num_rounds
        # the MTP caches have no holes: module 1's own drafts equal a no-cache MTP forward's predictions
        with torch.no_grad():
            full = model(torch.tensor([p + want]), mtp=True)
        mtp1 = full.mtp_logits[0][0].argmax(-1)  # [i] predicts token i+2
        for k, pos, tok in seen:
            if k == 1:
                assert tok == int(mtp1[pos - 2])


def test_speculative_stops_at_stop_token(mla):
    p = prompts_of([5], seed=15)[0]
    want = recompute_greedy(mla, p, 10)
    out = speculative_generate(mla, p, 10, stop_token_ids=[want[6]])
    assert out.finish_reason == "stop" and out.token_ids == want[:want.index(want[6]) + 1]


def test_incremental_detokenisation_equals_the_full_decode_at_every_step():
    """The engine decodes only the tokens since the last whole character (plus context), not the whole text at
    every step: at each length the result must equal decode(tokens), also when tokens split multi-byte
    characters (Chinese, emoji) or form invalid UTF-8."""
    import types

    from nanoseek.engine.engine import _Seq
    from nanoseek.tokenizer import train_tokenizer

    corpus = ["3 加 4 等于 7。", "The answer is 42. 答案是四十二！", "emoji 🙂 and ñ, ü, 中文 mixed"] * 20
    tok = train_tokenizer(corpus, vocab_size=320)
    eng = types.SimpleNamespace(tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    for text in corpus[:3] + [None, None]:
        ids = tok.encode(text) if text else torch.randint(7, 320, (60,), generator=g).tolist()  # random: bad UTF-8
        seq = _Seq(handle=None, index=0, generator=None)
        for n in range(1, len(ids) + 1):
            seq.tokens.append(ids[n - 1])
            assert Engine._decode_text(eng, seq, n) == tok.decode(ids[:n]), (text, n)
        assert seq.dec_done > 0 and seq.dec_ctx > 0  # the stable point really advanced


def test_incremental_detokenisation_keeps_context_for_decoders_that_strip_a_leading_space():
    """SentencePiece-style decoders drop the first piece's leading space: decoding only the new tokens would
    glue words together, so the new tokens are decoded after the previous ones."""
    import types

    from nanoseek.engine.engine import _Seq

    pieces = [" Hello", " world", ",", " again"]
    tok = types.SimpleNamespace(decode=lambda ids: "".join(pieces[i] for i in ids).lstrip(" "))
    eng, seq = types.SimpleNamespace(tokenizer=tok), _Seq(handle=None, index=0, generator=None)
    for n, i in enumerate([0, 1, 2, 3, 1], start=1):
        seq.tokens.append(i)
        assert Engine._decode_text(eng, seq, n) == tok.decode(seq.tokens)
    assert seq.dec_text == "Hello world, again world"


def test_vanishing_temperature_and_huge_top_k_sample_like_greedy_and_off():
    """temperature 1e-300 made logits / T overflow (every row drew token 0); top_k 2**63 overflowed the tensor
    the sampler builds. Below GREEDY_EPS is greedy; a top_k beyond the vocabulary is no truncation."""
    from nanoseek.engine.sampling import make_generator, sample

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    tiny = [SamplingParams(temperature=1e-300) for _ in range(4)]
    assert all(p.greedy for p in tiny)
    assert torch.equal(sample(logits, tiny, [None] * 4).tokens, logits.argmax(-1))
    huge = [SamplingParams(top_k=2 ** 63, seed=1) for _ in range(4)]
    off = [SamplingParams(top_k=0, seed=1) for _ in range(4)]
    a = sample(logits, huge, [make_generator(1, "cpu") for _ in range(4)]).tokens
    b = sample(logits, off, [make_generator(1, "cpu") for _ in range(4)]).tokens
    assert torch.equal(a, b)


def test_engine_leaves_a_mixed_precision_model_as_it_is():
    """bf16 training (precision.MasterWeights) keeps the router weights fp32 in a bf16 model and optimises them
    directly: an engine built on that model (GRPO's rollouts) must not cast them (it did: a bf16 router weight
    then met its fp32 AdamW state on resume). An explicit dtype still casts."""
    from nanoseek import precision as P
    from nanoseek.train.common import make_optimizer

    model = random_model(tiny_config(), seed=4)
    opt, _ = P.prepare(model, lambda named: make_optimizer(model, 1e-3, params=named), "bf16")
    gates = [m.gate.weight for m in (layer.mlp for layer in model.model.layers) if hasattr(m, "gate")]
    assert gates and all(w.dtype == torch.float32 for w in gates)
    eng = Engine(model, max_batch_size=2, max_len=32)
    assert eng.dtype == torch.bfloat16 and all(w.dtype == torch.float32 for w in gates)
    out = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 4
    Engine(model, max_batch_size=2, max_len=32, dtype=torch.bfloat16)
    assert all(w.dtype == torch.bfloat16 for w in gates)
