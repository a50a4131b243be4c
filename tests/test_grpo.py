"""GRPO end to end on micro models: keep routing / sampling mask reproduce the sampler's log-probs, a short
run raises the reward, resume and config errors."""

import random

import pytest
import torch

import nanoseek
from nanoseek.tasks import get_task, sample_problem
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.common import read_metrics
from nanoseek.train.grpo import GRPOConfig, build_batch, grpo, policy_logprobs, rollout


def _rollout(micro_base, **kw):
    model = nanoseek.from_pretrained(micro_base)
    tok = Tokenizer.load(micro_base)
    cfg = GRPOConfig(init_from=str(micro_base), prompts_per_step=3, num_generations=4, max_tokens=12,
                     temperature=0.9, **kw)
    rng = random.Random(0)
    problems = [sample_problem(get_task("arithmetic"), rng, 1, "en") for _ in range(3)]
    ro = rollout(model, tok, cfg, problems, step=0)
    moe = sum(1 for layer in model.model.layers[: model.config.num_hidden_layers] if layer.is_moe)
    batch = build_batch(ro["seqs"], tok.pad_id, moe, model.config.num_experts_per_tok, cfg.keep_sampling_mask,
                        cfg.keep_routing)
    return model, cfg, batch


def test_keep_routing_and_sampling_mask_reproduce_sampler_logprobs(micro_base):
    model, cfg, batch = _rollout(micro_base, top_k=5, top_p=0.9)
    rows = torch.arange(batch["ids"].shape[0])
    with torch.no_grad():
        logp, _ = policy_logprobs(model, batch, rows, cfg.temperature, forced=True, sampling_mask=True)
    m = batch["mask"].bool()
    assert m.sum() > 20
    assert (logp - batch["old"])[m].abs().max() < 1e-4
    # the support mask matters: without it top-k/top-p probabilities are not renormalised
    with torch.no_grad():
        full, _ = policy_logprobs(model, batch, rows, cfg.temperature, forced=True, sampling_mask=False)
    assert (full - batch["old"])[m].abs().max() > 1e-2
    # forced routing is really used: replaying other experts changes the log-probs
    routing = batch["routing"]
    assert routing and (routing[0] >= 0).any()
    batch["routing"] = [torch.where(r >= 0, (r + 1) % model.config.n_routed_experts, r) for r in routing]
    with torch.no_grad():
        other, _ = policy_logprobs(model, batch, rows, cfg.temperature, forced=True, sampling_mask=True)
    assert (other - batch["old"])[m].abs().max() > 1e-3


def test_short_run_raises_reward_on_an_easy_task(micro_base, tmp_path):
    tok = Tokenizer.load(micro_base)
    target = tok.encode("1")[0]

    def ones(prompt, completion, problem):  # easy and learnable from scratch: write many 1s
        return completion.count("1") / 12

    cfg = GRPOConfig(init_from=str(micro_base), out_dir=str(tmp_path / "g"), steps=30, prompts_per_step=4,
                     num_generations=6, max_tokens=12, lr=3e-3, reward_weights={}, eval_every=100,
                     eval_problems=4, tensorboard=False, keep_routing=True)
    out = grpo(cfg, extra_rewards={"ones": ones})
    m = [r for r in read_metrics(out.parent) if "reward" in r]
    first = sum(r["reward"] for r in m[:3]) / 3
    last = sum(r["reward"] for r in m[-3:]) / 3
    assert last > first + 0.15, (first, last)
    assert {"reward_ones", "zero_spread_frac", "clip_frac", "entropy", "completion_length", "kl"} <= set(m[-1])
    assert target >= 0


def test_kl_reference_and_resume(micro_base, tmp_path):
    kw = dict(init_from=str(micro_base), steps=4, prompts_per_step=2, num_generations=3, max_tokens=8, lr=1e-2,
              beta=0.05, ref_refresh_every=2, num_iterations=2, minibatch_size=4, eval_every=100, eval_problems=2,
              tensorboard=False, save_every=100, loss_type="dapo", reward_weights={})
    extra = {"ones": lambda prompt, completion, problem: completion.count("1") / 8}
    a = grpo(GRPOConfig(out_dir=str(tmp_path / "a"), **kw), extra_rewards=extra)
    grpo(GRPOConfig(out_dir=str(tmp_path / "b"), stop_after=3, **kw), extra_rewards=extra)
    assert (tmp_path / "b" / "checkpoints" / "step_0000003" / "ref" / "config.json").exists()
    b = grpo(GRPOConfig(out_dir=str(tmp_path / "b"), **kw), extra_rewards=extra)
    ma, mb = read_metrics(a.parent), read_metrics(b.parent)
    assert [r["reward"] for r in ma if "reward" in r] == [r["reward"] for r in mb if "reward" in r]
    assert any(r.get("kl", 0) > 0 for r in ma)
    sa, sb = nanoseek.from_pretrained(a).state_dict(), nanoseek.from_pretrained(b).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not (a / "ref").exists()


@pytest.mark.parametrize("field,value", [("num_generations", 1), ("temperature", 0.0), ("loss_type", "ppo"),
                                         ("tasks", ["chess"]), ("reward_weights", {"vibes": 1.0})])
def test_bad_grpo_config_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**{field: value})


def test_skipping_zero_advantage_rows_keeps_the_update(micro_base, tmp_path):
    """Rows with A = 0 (zero-spread groups) are not forwarded, yet the update is the one over all rows."""
    def half(prompt, completion, problem):  # groups of odd answers all score 0: zero spread, A = 0
        return len(completion) / 40 if int(problem.answer) % 2 == 0 else 0.0

    kw = dict(init_from=str(micro_base), steps=1, prompts_per_step=6, num_generations=4, max_tokens=12, lr=1e-3,
              reward_weights={}, eval_every=100, eval_problems=2, tensorboard=False, minibatch_size=5,
              levels=[1], seed=3)
    outs, metrics = {}, {}
    for skip in (True, False):
        out = grpo(GRPOConfig(out_dir=str(tmp_path / str(skip)), skip_zero_advantage=skip, **kw),
                   extra_rewards={"half": half})
        outs[skip] = nanoseek.from_pretrained(out).state_dict()
        metrics[skip] = [r for r in read_metrics(out.parent) if "reward" in r][-1]
    assert 0 < metrics[True]["trained_frac"] < 1 and metrics[False]["trained_frac"] == 1
    init = nanoseek.from_pretrained(micro_base).state_dict()
    assert any(not torch.equal(outs[True][k], init[k]) for k in init)  # it did train
    for k in init:
        torch.testing.assert_close(outs[True][k], outs[False][k], rtol=1e-4, atol=1e-6)


def test_grpo_lr_schedule_follows_steps_or_the_time_budget():
    from nanoseek.train.grpo import grpo_lr

    cfg = GRPOConfig(lr=1e-4, warmup=4, steps=104)
    assert grpo_lr(cfg, 0) == pytest.approx(2.5e-5) and grpo_lr(cfg, 50) == 1e-4  # constant after warmup
    cos = GRPOConfig(lr=1e-4, warmup=4, steps=104, lr_schedule="cosine", min_lr_ratio=0.1)
    assert grpo_lr(cos, 4) == pytest.approx(1e-4)
    assert grpo_lr(cos, 54) == pytest.approx(5.5e-5)  # half way: (1e-4 + 1e-5) / 2
    assert grpo_lr(cos, 104) == pytest.approx(1e-5)
    timed = GRPOConfig(lr=1e-4, warmup=4, steps=1000, lr_schedule="cosine", min_lr_ratio=0.1, time_limit_s=600)
    assert grpo_lr(timed, 10, elapsed_s=300) == pytest.approx(5.5e-5)  # the clock is further along
    assert grpo_lr(timed, 10, elapsed_s=900) == pytest.approx(1e-5)
