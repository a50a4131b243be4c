"""`speculative="auto"`: speculative decoding only where its measured speed beats plain decoding. The choice
follows the measured ratio (timings forced through an injected clock or a patched probe), the printed reason
carries the numbers, and the greedy tokens are the same whichever way it goes."""

from __future__ import annotations

import itertools

import pytest
import torch

from nanoseek.engine import DecodeProbe, Engine, SamplingParams, choose_speculative, greedy_generate, probe_decode
from nanoseek.engine import speculative as spec_mod
from nanoseek.engine.speculative import decide
from oracle import random_model, tiny_config

PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.fixture(scope="module")
def mla():
    return random_model(tiny_config(), seed=1)


def probe(batch=1, plain_step_s=0.010, spec_round_s=0.015, drafted=10, accepted=10, num_draft=1):
    return DecodeProbe(batch, plain_step_s, spec_round_s, drafted, accepted, num_draft, 6, 6)


def test_decide_follows_the_measured_ratio():
    # acceptance 1, one draft: 2 tokens per 15 ms round = 133.3 tok/s against 1 token per 10 ms = 100 tok/s
    c = decide(probe())
    assert c.speculative and c.mode == "auto"
    assert "on (auto)" in c.reason and "133.3 tokens/s" in c.reason and "100.0 tokens/s" in c.reason
    assert "acceptance 1.00 over 10 drafts" in c.reason and "1.33x" in c.reason and "15.00 ms round" in c.reason
    # the same round time at acceptance 0.4: 1.4 / 15 ms = 93.3 tok/s < 100
    c = decide(probe(accepted=4))
    assert not c.speculative and "off (auto)" in c.reason and "93.3 tokens/s" in c.reason and "0.93x" in c.reason
    # plain decoding at batch 4 makes 4 tokens a step: 400 tok/s beats any batch-1 speculative round here
    c = decide(probe(batch=4, plain_step_s=0.010, spec_round_s=0.005))
    assert not c.speculative and "batch 4" in c.reason and "400.0 tokens/s" in c.reason
    # two drafts: expected tokens per round 1 + a + a^2
    assert probe(drafted=20, accepted=10, num_draft=2).tokens_per_round == pytest.approx(1.75)
    # a tie is not a win: speculative must be strictly faster
    assert not decide(probe(accepted=0, plain_step_s=0.01, spec_round_s=0.01)).speculative


def test_probe_measures_with_the_given_clock_and_leaves_the_engine_as_new(mla):
    """A clock that advances 1 s per reading: every timed plain step and every speculative round reads it twice /
    once, so both come out at exactly 1 s; the batch is the job's (capped by max_batch_size)."""
    eng = Engine(mla, max_batch_size=2, max_len=64, eos_token_ids=[])
    fake = itertools.count()
    p = probe_decode(eng, PROMPTS, steps=3, warmup=1, repeats=2, clock=lambda: float(next(fake)))
    assert (p.batch, p.plain_step_s, p.spec_round_s, p.num_draft) == (2, 1.0, 1.0, 1)
    assert p.plain_steps == 2 * 3 and p.spec_rounds >= 2 * 3
    want = spec_mod.speculative_generate(mla, PROMPTS[0], 1 + 4 * 2)  # the probe's own speculative run
    assert (p.num_drafted, p.num_accepted) == (want.num_drafted, want.num_accepted)
    assert p.plain_tokens_per_s == 2.0 and p.spec_tokens_per_s == pytest.approx(1 + p.acceptance_rate)
    assert not decide(p).speculative  # 2 rows a step beat at most 2 tokens a round
    # the engine is idle, holds no prefixes and did not count the probe's forwards
    assert not eng.has_unfinished() and all(k == [] for k in eng.kept) and eng.num_forwards == 0
    # a real clock: finite positive times
    p = probe_decode(eng, PROMPTS[:1], steps=2, warmup=1, repeats=1)
    assert p.batch == 1 and 0 < p.plain_step_s < 60 and 0 < p.spec_round_s < 60


@pytest.mark.parametrize("dsa", [False, True])
@pytest.mark.parametrize("faster", ["speculative", "plain"])
def test_auto_takes_the_faster_path_and_the_tokens_are_the_same(faster, dsa, monkeypatch):
    model = random_model(tiny_config(index_topk=4), seed=2) if dsa else random_model(tiny_config(), seed=1)
    measured = probe(spec_round_s=0.005 if faster == "speculative" else 0.050, accepted=3)
    calls = []
    monkeypatch.setattr(spec_mod, "probe_decode", lambda engine, prompts: calls.append(len(prompts)) or measured)
    eng = Engine(model, max_batch_size=4, max_len=64, eos_token_ids=[])
    want = [o.outputs[0].token_ids for o in eng.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0))]
    choice, outs = greedy_generate(eng, PROMPTS, 10, "auto")
    assert calls == [3] and choice.probe is measured and choice.speculative == (faster == "speculative")
    assert [o.token_ids for o in outs] == want
    drafted = sum(o.num_drafted for o in outs)
    assert drafted > 0 if choice.speculative else drafted == 0
    # a stop token ends both paths alike (kept in token_ids)
    stop = want[0][4]
    _, outs = greedy_generate(eng, PROMPTS[:1], 10, "auto", stop_token_ids=[stop])
    assert outs[0].token_ids == want[0][:want[0].index(stop) + 1] and outs[0].finish_reason == "stop"


def test_on_and_off_do_not_measure(mla, monkeypatch):
    monkeypatch.setattr(spec_mod, "probe_decode", lambda *a, **k: pytest.fail("measured in a fixed mode"))
    eng = Engine(mla, max_batch_size=4, max_len=64, eos_token_ids=[])
    on, outs_on = eng.generate_greedy(PROMPTS, 8, speculative="on")
    off, outs_off = eng.generate_greedy(PROMPTS, 8, speculative="off")
    assert on.speculative and not off.speculative and "as asked" in on.reason
    assert [o.token_ids for o in outs_on] == [o.token_ids for o in outs_off]
    with pytest.raises(ValueError, match="auto"):
        choose_speculative(eng, PROMPTS, "sometimes")


def test_auto_is_off_without_mtp_modules_and_on_is_an_error():
    model = random_model(tiny_config(num_nextn_predict_layers=0), seed=3)
    eng = Engine(model, max_batch_size=2, max_len=32, eos_token_ids=[])
    c = choose_speculative(eng, PROMPTS, "auto")
    assert not c.speculative and "no MTP modules" in c.reason
    with pytest.raises(ValueError, match="MTP"):
        choose_speculative(eng, PROMPTS, "on")
    _, outs = greedy_generate(eng, PROMPTS, 5)
    assert all(len(o.token_ids) == 5 for o in outs)
