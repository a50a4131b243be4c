"""GRPO end to end on micro models: keep routing (prompt positions included) / sampling mask reproduce the
sampler's log-probs, independent rollout randomness per sample, a short run raises the reward, resume and config
errors, and one short run per trainer path (scale_rewards, mask_truncated, dynamic sampling, domain_beta,
dr_grpo, the off-policy mask, truncated importance sampling, log_every) asserting its observable effect."""

import os
import random
import sys
from types import SimpleNamespace

import pytest
import torch

import nanoseek
from nanoseek.tasks import get_task, sample_problem
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.common import read_metrics
from nanoseek.train.grpo import GRPOConfig, build_batch, grpo, policy_logprobs, rollout


def _rollout(micro_base, model=None, **kw):
    model = model if model is not None else nanoseek.from_pretrained(micro_base)
    tok = Tokenizer.load(micro_base)
    cfg = GRPOConfig(init_from=str(micro_base), prompts_per_step=3, num_generations=4, max_tokens=12,
                     temperature=0.9, **kw)
    rng = random.Random(0)
    problems = [sample_problem(get_task("arithmetic"), rng, 1, "en") for _ in range(3)]
    ro = rollout(model, tok, cfg, problems, step=0)
    moe = sum(1 for layer in model.model.layers[: model.config.num_hidden_layers] if layer.is_moe)
    batch = build_batch(ro["seqs"], tok.pad_id, moe, model.config.num_experts_per_tok, cfg.keep_sampling_mask,
                        cfg.keep_routing)
    return model, cfg, batch, ro


def test_keep_routing_and_sampling_mask_reproduce_sampler_logprobs(micro_base):
    model, cfg, batch, ro = _rollout(micro_base, top_k=5, top_p=0.9)
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
    batch["routing"] = routing


def test_keep_routing_rows_put_each_completion_after_its_prompt_even_with_partial_prompt_routing():
    """build_batch's routing rows: a group's shared prompt routing fills positions 0..P-2, each completion's routing
    starts at P - 1 (the position whose logits gave its first token); a prompt routing that covers fewer positions
    fills what it covers and leaves the rest free (-1), without moving the completion's."""
    moe, k = 2, 2
    pr = torch.arange(5 * moe * k).view(5, moe, k)  # a 5-token prompt's routing
    short = pr[:2]  # covers only positions 0-1 of a 5-token prompt
    def seq(prompt_routing, n_tok, base):
        c = SimpleNamespace(token_ids=[7] * n_tok, logprobs=[-0.1] * n_tok, loss_mask=None, sampling_masks=None,
                            routing=torch.full((n_tok, moe, k), base), prompt_routing=prompt_routing)
        return dict(prompt=[1, 2, 3, 4, 5], completion=c)
    seqs = [seq(pr, 3, 100), seq(pr, 2, 200), seq(short, 2, 300)]
    full = torch.stack(build_batch(seqs, 0, moe, k, keep_mask=False, keep_routing=True)["routing"], dim=2)
    assert full.shape == (3, 8, moe, k)  # T = 5 + 3
    assert torch.equal(full[0, :4], pr[:4]) and torch.equal(full[1, :4], pr[:4])
    assert (full[0, 4:7] == 100).all() and (full[0, 7:] == -1).all()
    assert (full[1, 4:6] == 200).all() and (full[1, 6:] == -1).all()
    assert torch.equal(full[2, :2], short) and (full[2, 2:4] == -1).all()
    assert (full[2, 4:6] == 300).all() and (full[2, 6:] == -1).all()


def test_keep_routing_replays_the_prompt_positions_too(micro_base):
    """V3.2 keep routing: every position the sampler routed (prompt included) is forced in the training forward,
    with the experts the sampler's prefill chose there. A random 3-layer model whose MoE layer 1 feeds the
    attention of layer 2 (micro_base's only MoE layer is its last: prompt routing could not matter there)."""
    from oracle import random_model, tiny_config

    model = random_model(tiny_config(vocab_size=Tokenizer.load(micro_base).vocab_size), seed=4)
    model, cfg, batch, ro = _rollout(micro_base, model=model, top_k=5, top_p=0.9)
    rows = torch.arange(batch["ids"].shape[0])
    routing = batch["routing"]
    for n, s in enumerate(ro["seqs"]):
        lp, lc = len(s["prompt"]), len(s["completion"].token_ids)
        for r in routing:  # forced at every position that fed the sampler: prompt and completion[:-1]
            assert (r[n, :lp - 1 + lc] >= 0).all() and (r[n, lp - 1 + lc:] == -1).all()
    # the recorded prompt routing is the sampler's: a free full forward over the prompt routes the same
    with torch.no_grad():
        free = model(batch["ids"], mtp=False).router
    for n, s in enumerate(ro["seqs"]):
        lp = len(s["prompt"])
        for layer, r in enumerate(routing):
            assert torch.equal(r[n, :lp].sort(-1).values, free[layer].expert_ids[n, :lp].sort(-1).values)
    # and the prompt positions are really replayed: other experts there (completion routing untouched) change
    # the completion log-probs
    prompt_only = torch.zeros_like(routing[0][..., 0], dtype=torch.bool)
    for n, s in enumerate(ro["seqs"]):
        prompt_only[n, :len(s["prompt"]) - 1] = True
    E = model.config.n_routed_experts
    batch["routing"] = [torch.where(prompt_only.unsqueeze(-1), (r + 1) % E, r) for r in routing]
    with torch.no_grad():
        other, _ = policy_logprobs(model, batch, rows, cfg.temperature, forced=True, sampling_mask=True)
    m = batch["mask"].bool()
    assert (other - batch["old"])[m].abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- rollout randomness


def _problems(n, seed=0):
    rng = random.Random(seed)
    return [sample_problem(get_task("arithmetic"), rng, 1, "en") for _ in range(n)]


def _completions(ro, G):
    toks = [tuple(s["completion"].token_ids) for s in ro["seqs"]]
    return [toks[i * G:(i + 1) * G] for i in range(len(toks) // G)]


def test_same_prompt_twice_in_a_rollout_gets_independent_samples(micro_base):
    model, tok = nanoseek.from_pretrained(micro_base), Tokenizer.load(micro_base)
    cfg = GRPOConfig(init_from=str(micro_base), num_generations=8, max_tokens=16, temperature=1.0, keep_routing=False)
    p = _problems(1)[0]
    a, b = _completions(rollout(model, tok, cfg, [p, p], step=0), 8)
    assert len(set(a)) > 1 and set(a) != set(b)
    assert sum(x == y for x, y in zip(a, b)) == 0  # sample i of each copy: independent draws
    # reproducible from (seed, step): the same rollout again gives the same completions; another step does not
    assert _completions(rollout(model, tok, cfg, [p, p], step=0), 8) == [a, b]
    assert _completions(rollout(model, tok, cfg, [p, p], step=1), 8) != [a, b]


def test_rollouts_reuse_one_engine_that_never_reads_a_prefix_of_older_weights(micro_base):
    """With the caller's `engines` dict a rollout makes its Engine once, resets it before each call and frees its
    cache after. The samples are a new engine's, also after the weights changed in place: a reset forgets every
    cached prefix, which would hold the latents of the weights before the update."""
    model, tok = nanoseek.from_pretrained(micro_base), Tokenizer.load(micro_base)
    cfg = GRPOConfig(init_from=str(micro_base), num_generations=4, max_tokens=8, temperature=1.0, keep_routing=False)
    probs, engines = _problems(3), {}

    def samples(ro):
        return [(tuple(s["completion"].token_ids), tuple(s["completion"].logprobs)) for s in ro["seqs"]]

    first = rollout(model, tok, cfg, probs, step=0, engines=engines)
    engine = engines["rollout"]
    assert engine.cache is None  # released: the update runs without it
    assert samples(first) == samples(rollout(model, tok, cfg, probs, step=0))
    with torch.no_grad():  # an update, in place
        for p in model.parameters():
            p.mul_(1.25)
    again = rollout(model, tok, cfg, probs, step=0, engines=engines)
    assert engines["rollout"] is engine and engine.num_prefill_tokens == sum(len(p) for p in
                                                                            [s["prompt"] for s in again["seqs"][::4]])
    assert samples(again) == samples(rollout(model, tok, cfg, probs, step=0)) != samples(first)


def test_different_prompts_do_not_share_random_draws(micro_base, monkeypatch):
    """With the logits replaced by a flat distribution a sampled token is a pure function of the row's random
    draws: rows sharing a random stream would pick the same tokens."""
    import nanoseek.engine.engine as eng

    real = eng.sample
    monkeypatch.setattr(eng, "sample", lambda logits, *a, **k: real(torch.zeros_like(logits), *a, **k))
    model, tok = nanoseek.from_pretrained(micro_base), Tokenizer.load(micro_base)
    cfg = GRPOConfig(init_from=str(micro_base), num_generations=4, max_tokens=6, keep_routing=False)
    groups = _completions(rollout(model, tok, cfg, _problems(3), step=0), 4)
    firsts = [t[0] for g in groups for t in g]
    assert len(set(firsts)) >= len(firsts) - 2  # 12 draws from a flat 500-way distribution: ~no collisions
    for i in range(4):
        assert len({g[i] for g in groups}) == 3


def _ones_per_completion(model_dir, tok, problems):
    """Mean count of "1" in fresh temperature-1 completions of held-out problems."""
    cfg = GRPOConfig(init_from=str(model_dir), num_generations=4, max_tokens=12, temperature=1.0, seed=123)
    ro = rollout(nanoseek.from_pretrained(model_dir), tok, cfg, problems, step=0)
    return sum(s["completion"].text.count("1") for s in ro["seqs"]) / len(ro["seqs"])


@pytest.mark.parametrize("async_rollouts", [False, True])
def test_short_run_raises_reward_on_an_easy_task(micro_base, tmp_path, async_rollouts):
    tok = Tokenizer.load(micro_base)

    def ones(prompt, completion, problem):  # easy and learnable from scratch: write many 1s
        return completion.count("1") / 12

    cfg = GRPOConfig(init_from=str(micro_base), out_dir=str(tmp_path / "g"), steps=30, prompts_per_step=4,
                     num_generations=6, max_tokens=12, lr=3e-3, reward_weights={}, eval_every=100,
                     eval_problems=4, tensorboard=False, keep_routing=True, async_rollouts=async_rollouts)
    out = grpo(cfg, extra_rewards={"ones": ones})
    m = [r for r in read_metrics(out.parent) if "reward" in r]
    first = sum(r["reward"] for r in m[:3]) / 3
    last = sum(r["reward"] for r in m[-3:]) / 3
    assert last > first + 0.15, (first, last)
    assert {"reward_ones", "zero_spread_frac", "clip_frac", "entropy", "completion_length", "kl"} <= set(m[-1])
    # the saved policy itself writes more "1"s on problems it never trained on (fresh samples, not the log)
    probs = _problems(6, seed=5)
    before, after = _ones_per_completion(micro_base, tok, probs), _ones_per_completion(out, tok, probs)
    assert after > before + 1.0, (before, after)


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


def test_async_rollouts_sample_a_step_behind_and_resume_bit_exact_at_any_step(micro_base, tmp_path, monkeypatch):
    """async_rollouts: step t+1's groups are sampled (on a background thread) by the weights of the start of step t,
    so every step after the first trains on groups one optimizer step stale; the run differs from the synchronous
    one, and a stop at a step that is not a save step, then resume (from the checkpoint's sampler/), gives the same
    run bit for bit."""
    import nanoseek.train.grpo as G

    kw = dict(init_from=str(micro_base), steps=5, prompts_per_step=2, num_generations=3, max_tokens=8, lr=1e-2,
              minibatch_size=4, eval_every=2, eval_problems=2, tensorboard=False, save_every=100, loss_type="dapo",
              reward_weights={})
    extra = {"ones": lambda prompt, completion, problem: completion.count("1") / 8}
    samplers, trainers, real_rollout, real_optimise = {}, {}, G.rollout, G.optimise
    fingerprint = lambda model: float(model.model.embed_tokens.weight.detach().double().sum())

    def spy_rollout(model, *a, **k):  # the weights that sampled each step's groups
        samplers[a[3]] = fingerprint(model)
        return real_rollout(model, *a, **k)

    def spy_optimise(model, *a, **k):  # the weights each step starts training from
        trainers[k.get("step", a[9] if len(a) > 9 else None)] = fingerprint(model)
        return real_optimise(model, *a, **k)
    monkeypatch.setattr(G, "rollout", spy_rollout)
    monkeypatch.setattr(G, "optimise", spy_optimise)
    sync = grpo(GRPOConfig(out_dir=str(tmp_path / "sync"), **kw), extra_rewards=extra)
    assert samplers == trainers and len(samplers) == 5  # synchronous: each step samples with the weights it trains
    samplers.clear(), trainers.clear()
    kw["async_worker"] = "thread"  # the spies see the rollouts: a worker process's calls stay in that process
    full = grpo(GRPOConfig(out_dir=str(tmp_path / "a"), async_rollouts=True, **kw), extra_rewards=extra)
    # step 0 from the initial weights; step t + 1 from the weights step t started with
    assert samplers[0] == trainers[0] and all(samplers[t + 1] == trainers[t] for t in range(4))
    # ... which differ from step t + 1's own wherever step t changed the weights (a step whose groups all tie
    # changes nothing)
    moved = [t for t in range(1, 5) if trainers[t] != trainers[t - 1]]
    assert len(moved) >= 2 and all(samplers[t] != trainers[t] for t in moved), (samplers, trainers)
    rows = lambda out: [(r["reward"], r.get("loss"), r.get("grad_norm")) for r in read_metrics(out.parent)
                        if "reward" in r]
    assert rows(full) != rows(sync)
    assert [r["policy_lag"] for r in read_metrics(full.parent) if "reward" in r] == [0, 1, 1, 1, 1]
    grpo(GRPOConfig(out_dir=str(tmp_path / "b"), async_rollouts=True, stop_after=3, **kw), extra_rewards=extra)
    assert (tmp_path / "b" / "checkpoints" / "step_0000003" / "sampler" / "config.json").exists()
    resumed = grpo(GRPOConfig(out_dir=str(tmp_path / "b"), async_rollouts=True, **kw), extra_rewards=extra)
    assert rows(full) == rows(resumed)
    sa, sb = nanoseek.from_pretrained(full).state_dict(), nanoseek.from_pretrained(resumed).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not (full / "sampler").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="the rollout worker process is forked (Linux)")
def test_async_rollouts_in_a_worker_process_equal_the_thread_and_resume_bit_exact(micro_base, tmp_path):
    """async_worker="process": the rollouts run in a forked process that reads the sampler's weights from shared
    memory and sends its groups back pickled. Same groups, same run as the thread worker (both sample on one thread),
    so the process must see every step's new weights (a stale packed decode copy would sample from old ones), and
    a stop between save steps resumes bit-exact. A reward that records its process id shows where it ran (the
    held-out evaluation scores with it too, in this process)."""
    kw = dict(init_from=str(micro_base), steps=5, prompts_per_step=2, num_generations=3, max_tokens=8, lr=1e-2,
              minibatch_size=4, eval_every=2, eval_problems=2, tensorboard=False, save_every=100, loss_type="dapo",
              reward_weights={}, async_rollouts=True)
    log = tmp_path / "pids"
    pids = lambda: set(log.read_text().split()) if log.exists() else set()

    def ones(prompt, completion, problem):
        with open(log, "a") as f:  # a file: the worker process's memory is its own
            f.write(f"{os.getpid()}\n")
        return completion.count("1") / 8

    rows = lambda out: [(r["reward"], r.get("loss"), r.get("grad_norm"), r["policy_lag"]) for r in read_metrics(out.parent)
                        if "reward" in r]
    thread = grpo(GRPOConfig(out_dir=str(tmp_path / "t"), async_worker="thread", **kw), extra_rewards={"ones": ones})
    assert pids() == {str(os.getpid())}
    log.unlink()
    proc = grpo(GRPOConfig(out_dir=str(tmp_path / "p"), async_worker="process", **kw), extra_rewards={"ones": ones})
    assert len(pids() - {str(os.getpid())}) == 1  # the training rewards were computed in the worker (evaluation: here)
    assert rows(proc) == rows(thread) and len(rows(proc)) == 5
    sa, sb = nanoseek.from_pretrained(thread).state_dict(), nanoseek.from_pretrained(proc).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    grpo(GRPOConfig(out_dir=str(tmp_path / "r"), async_worker="process", stop_after=3, **kw), extra_rewards={"ones": ones})
    resumed = grpo(GRPOConfig(out_dir=str(tmp_path / "r"), async_worker="process", **kw), extra_rewards={"ones": ones})
    assert rows(resumed) == rows(proc)
    sc = nanoseek.from_pretrained(resumed).state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    with pytest.raises(ValueError, match="async_worker must be"):
        GRPOConfig(init_from=str(micro_base), async_worker="fork")


@pytest.mark.skipif(sys.platform != "linux", reason="the rollout worker process is forked (Linux)")
def test_async_worker_without_room_in_shared_memory_falls_back_to_a_thread_or_says_why(monkeypatch, capsys):
    """The worker reads the sampler's weights from shared memory; where they do not fit (a container's 64 MB
    /dev/shm), "auto" takes a thread and says so, "process" is a clear error."""
    from nanoseek.train.grpo import AsyncRollouts

    def full(self):
        raise RuntimeError("unable to write to file </torch_1>: No space left on device (28)")

    monkeypatch.setattr(torch.nn.Module, "share_memory", full)
    cfg = lambda worker: SimpleNamespace(async_worker=worker)
    model, sampler = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    auto = AsyncRollouts(cfg("auto"), model, sampler, lambda step: {})
    assert auto.worker == "thread" and "shared memory" in capsys.readouterr().err
    auto.close(shutdown=True)
    with pytest.raises(ValueError, match="do not fit in shared memory.*No space left"):
        AsyncRollouts(cfg("process"), model, sampler, lambda step: {})


@pytest.mark.skipif(sys.platform != "linux", reason="the rollout worker process is forked (Linux)")
def test_async_rollout_worker_errors_reach_the_trainer(micro_base, tmp_path):
    """A reward that raises in the worker process raises the same exception in the trainer; a worker that dies
    (here it exits from inside a reward at step 2) is a clear error naming the step, and the checkpoint written
    before it is intact."""
    kw = dict(init_from=str(micro_base), steps=4, prompts_per_step=2, num_generations=3, max_tokens=8, lr=1e-2,
              minibatch_size=4, eval_every=0, tensorboard=False, save_every=1, loss_type="dapo", reward_weights={},
              async_rollouts=True, async_worker="process")

    def raises(prompt, completion, problem):
        raise KeyError("a column the reward needs")

    with pytest.raises(KeyError, match="a column the reward needs"):
        grpo(GRPOConfig(out_dir=str(tmp_path / "raise"), **kw), extra_rewards={"r": raises})
    marker = tmp_path / "sampled"

    def dies_at_step_2(prompt, completion, problem):
        n = len(marker.read_text()) if marker.exists() else 0
        with open(marker, "a") as f:
            f.write("x")
        if n >= 12:  # the first two steps' 6 completions each were scored
            os._exit(3)
        return 1.0

    with pytest.raises(RuntimeError, match="worker process died while sampling step 2"):
        grpo(GRPOConfig(out_dir=str(tmp_path / "die"), **kw), extra_rewards={"r": dies_at_step_2})
    assert (tmp_path / "die" / "checkpoints" / "step_0000001" / "config.json").exists()


def test_bf16_precision_rolls_out_and_trains_in_bf16_and_resumes_bit_exact(micro_base, tmp_path, monkeypatch):
    """precision="bf16": bf16 weights between steps (rollouts and training forward in bf16), fp32 masters; the
    run differs from fp32's, a stop and resume gives the same run bit for bit, and the saved folder is fp32."""
    import nanoseek.train.grpo as G
    from safetensors import safe_open

    kw = dict(init_from=str(micro_base), steps=4, prompts_per_step=2, num_generations=3, max_tokens=8, lr=1e-2,
              beta=0.05, ref_refresh_every=2, num_iterations=2, minibatch_size=4, eval_every=100, eval_problems=2,
              tensorboard=False, save_every=100, loss_type="dapo", reward_weights={})
    extra = {"ones": lambda prompt, completion, problem: completion.count("1") / 8}
    dtypes, real_rollout = [], G.rollout

    def spy(model, *a, **k):  # the dtype the engine samples with
        dtypes.append(next(model.parameters()).dtype)
        return real_rollout(model, *a, **k)
    monkeypatch.setattr(G, "rollout", spy)
    fp32 = grpo(GRPOConfig(out_dir=str(tmp_path / "fp32"), precision="fp32", **kw), extra_rewards=extra)
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    full = grpo(GRPOConfig(out_dir=str(tmp_path / "a"), precision="bf16", **kw), extra_rewards=extra)
    assert set(dtypes) == {torch.bfloat16}
    grpo(GRPOConfig(out_dir=str(tmp_path / "b"), precision="bf16", stop_after=3, **kw), extra_rewards=extra)
    resumed = grpo(GRPOConfig(out_dir=str(tmp_path / "b"), precision="bf16", **kw), extra_rewards=extra)
    rewards = lambda out: [(r["reward"], r["loss"]) for r in read_metrics(out.parent) if "reward" in r]
    assert rewards(full) == rewards(resumed)
    assert rewards(full) != rewards(fp32)
    sa, sb = nanoseek.from_pretrained(full).state_dict(), nanoseek.from_pretrained(resumed).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with safe_open(str(next(full.glob("*.safetensors"))), "pt") as st:  # written from the fp32 masters
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float32}


@pytest.mark.parametrize("field,value", [("num_generations", 1), ("temperature", 0.0), ("loss_type", "ppo"),
                                         ("precision", "fp8"),
                                         ("tasks", ["chess"]), ("reward_weights", {"vibes": 1.0})])
def test_bad_grpo_config_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**{field: value})


def test_skipping_zero_advantage_rows_keeps_the_update(micro_base, tmp_path):
    """Rows with A = 0 (zero-spread groups) are not forwarded, yet the update is the one over all rows."""
    def half(prompt, completion, problem):  # groups of odd answers all score 0: zero spread, A = 0
        return len(completion) / 40 if int(problem.answer) % 2 == 0 else 0.0

    # adam_epsilon 1e-3: Adam's first step moves a weight by lr * g / (|g| + eps), which for eps << |g| is
    # lr * sign(g) -- a gradient of 1e-10 that round-off flips would move the weight by a full lr. A larger eps
    # keeps the update proportional to the gradient, so this compares the gradients, not their round-off signs.
    kw = dict(init_from=str(micro_base), steps=1, prompts_per_step=6, num_generations=4, max_tokens=12, lr=1e-3,
              adam_epsilon=1e-3, reward_weights={}, eval_every=100, eval_problems=2, tensorboard=False,
              minibatch_size=5, levels=[1], seed=3)
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


# ---------------------------------------------------------------------------------------------- trainer paths


@pytest.fixture
def spy(monkeypatch):
    """Records every rollout and every grpo_loss call (positional args, kwargs) of a grpo() run."""
    import nanoseek.train.grpo as G

    rec = {"rollouts": [], "losses": [], "tamper": None}
    real_rollout, real_loss = G.rollout, G.grpo_loss

    def rollout_(*a, **k):
        ro = real_rollout(*a, **k)
        if rec["tamper"] is not None:
            rec["tamper"](ro["seqs"])
        rec["rollouts"].append(ro)
        return ro

    def loss_(*a, **k):
        rec["losses"].append((a, k))
        return real_loss(*a, **k)

    monkeypatch.setattr(G, "rollout", rollout_)
    monkeypatch.setattr(G, "grpo_loss", loss_)
    return rec


def _ones_reward(prompt, completion, problem):
    return completion.count("1") / 4 + len(completion) / 50


def _parity_reward(prompt, completion, problem):  # odd answers: every completion scores 0, a zero-spread group
    return len(completion) / 40 if int(problem.answer) % 2 == 0 else 0.0


def _run(micro_base, tmp_path, reward=_ones_reward, **kw):
    base = dict(init_from=str(micro_base), out_dir=str(tmp_path / "run"), steps=1, prompts_per_step=3,
                num_generations=4, max_tokens=8, lr=1e-3, reward_weights={}, eval_every=100, eval_problems=1,
                tensorboard=False, save_every=100)
    out = grpo(GRPOConfig(**{**base, **kw}), extra_rewards={"r": reward})
    return [r for r in read_metrics(out.parent) if "reward" in r]


def _rewards(seqs, reward=_ones_reward):
    return torch.tensor([reward(None, s["completion"].text, s["problem"]) for s in seqs])


@pytest.mark.parametrize("scale", ["none", "batch"])
def test_scale_rewards_sets_the_advantages_used(micro_base, tmp_path, spy, scale):
    from nanoseek.train.grpo_loss import group_advantages

    _run(micro_base, tmp_path, scale_rewards=scale)
    want = group_advantages(_rewards(spy["rollouts"][0]["seqs"]), 4, scale=scale)
    used = torch.cat([a[2] for a, _ in spy["losses"]])
    torch.testing.assert_close(used, want[want != 0])  # the trained rows, in order (A = 0 rows are skipped)
    other = group_advantages(_rewards(spy["rollouts"][0]["seqs"]), 4, scale="group")
    assert not torch.allclose(used, other[other != 0])


def test_mask_truncated_trains_only_complete_rows_and_counts_their_tokens(micro_base, tmp_path, spy):
    def tamper(seqs):  # every other completion truncated, the rest ended by EOS
        for n, s in enumerate(seqs):
            s["completion"].finish_reason = "length" if n % 2 else "stop"

    spy["tamper"] = tamper
    m = _run(micro_base, tmp_path, mask_truncated=True, loss_type="dapo")[-1]
    seqs = spy["rollouts"][0]["seqs"]
    rewards = _rewards(seqs)
    adv = torch.tensor([a for g in rewards.view(-1, 4) for a in (g - g.mean()) / (g.std() + 1e-4)])
    complete = [n for n in range(len(seqs)) if n % 2 == 0]
    assert m["truncated_frac"] == 0.5
    trained = sum(len(a[0]) for a, _ in spy["losses"])
    assert trained == sum(1 for n in complete if adv[n] != 0) and trained > 0
    assert all(not k["truncated"].any() for _, k in spy["losses"])
    # the dapo normaliser: the tokens of the complete rows only
    assert float(spy["losses"][0][1]["num_tokens"]) == sum(len(seqs[n]["completion"].token_ids) for n in complete)


@pytest.mark.parametrize("cap", [4, 0])
def test_dynamic_sampling_refills_the_batch_with_informative_groups(micro_base, tmp_path, spy, cap):
    m = _run(micro_base, tmp_path, reward=_parity_reward, dynamic_sampling=True, max_resample_rounds=cap,
             prompts_per_step=4, num_generations=3, seed=1)[-1]
    first = _rewards(spy["rollouts"][0]["seqs"], _parity_reward)
    n_first = int((first.view(-1, 3).amax(1) != first.view(-1, 3).amin(1)).sum())
    assert n_first < 4  # the first draw alone does not fill the batch (seed chosen so)
    assert m["resample_rounds"] == len(spy["rollouts"]) - 1
    assert m["resample_rollouts"] == sum(len(r["seqs"]) for r in spy["rollouts"][1:])
    if cap:
        assert m["resample_rounds"] >= 1 and m["informative_groups"] == 4
    else:
        assert m["resample_rounds"] == 0 and m["informative_groups"] == n_first
    # every trained row belongs to an informative group: the zero-spread groups never reach the loss
    assert all((a[2] != 0).any() for a, _ in spy["losses"])
    assert sum(len(a[0]) for a, _ in spy["losses"]) <= 3 * m["informative_groups"]


def test_domain_beta_overrides_beta_per_task(micro_base, tmp_path, spy):
    m = _run(micro_base, tmp_path, beta=0.0, domain_beta={"arithmetic": 0.3}, num_iterations=2, lr=1e-2)[-1]
    assert all(torch.equal(k["beta"], torch.full_like(k["beta"], 0.3)) for _, k in spy["losses"])
    assert all(k["ref_logp"] is not None for _, k in spy["losses"])
    assert m["kl"] > 0  # the reference is used and the policy moved away from it in the second iteration


def test_dr_grpo_normalises_by_rows_times_max_tokens(micro_base, tmp_path, spy):
    m = _run(micro_base, tmp_path, loss_type="dr_grpo")[-1]
    seqs = spy["rollouts"][0]["seqs"]
    r = _rewards(seqs).view(-1, 4)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    lengths = torch.tensor([len(s["completion"].token_ids) for s in seqs], dtype=torch.float32)
    # first update: rho = 1, loss = -sum_i A_i |o_i| / (N * max_tokens) with N = all 12 rows
    assert m["loss"] == pytest.approx(float(-(adv * lengths).sum() / (12 * 8)), rel=1e-3, abs=1e-5)
    assert all(k["loss_type"] == "dr_grpo" for _, k in spy["losses"])


def test_off_policy_mask_fires_when_the_policy_drifts(micro_base, tmp_path, spy):
    m = _run(micro_base, tmp_path, num_iterations=4, lr=5e-2, off_policy_delta=1e-3, minibatch_size=4)[-1]
    assert m["masked_seq_frac"] > 0
    masks = [k["seq_mask"] for _, k in spy["losses"]]
    assert all(bool(mk.all()) for mk in masks[:3])  # first iteration: pi_theta = pi_old, nothing masked
    assert any(not bool(mk.all()) for mk in masks[3:])


def test_truncated_importance_sampling_runs_in_the_trainer(micro_base, tmp_path, spy):
    m = _run(micro_base, tmp_path, importance_sampling_correction=True, importance_sampling_cap=1.5,
             num_iterations=2)[-1]
    ws = [k["is_weights"] for _, k in spy["losses"]]
    assert ws and all(w is not None and float(w.max()) <= 1.5 for w in ws)
    # keep routing + keep sampling mask: the trainer reproduces the sampler, so the weights are ~1
    assert m["is_weight"] == pytest.approx(1.0, abs=1e-3)
    # the ratio uses the trainer's pi_old: on the first iteration it is exactly the forward's own log-probs
    a, _ = spy["losses"][0]
    torch.testing.assert_close(a[1], a[0].detach())


def test_log_every_is_honoured(micro_base, tmp_path):
    kw = dict(init_from=str(micro_base), out_dir=str(tmp_path / "log"), steps=5, log_every=2, eval_every=3,
              prompts_per_step=2, num_generations=2, max_tokens=4, reward_weights={}, eval_problems=1,
              tensorboard=False, save_every=100)
    out = grpo(GRPOConfig(**kw), extra_rewards={"r": _ones_reward})
    steps = [r["step"] for r in read_metrics(out.parent)]
    assert steps == [0, 2, 3, 4, 5]  # the initial eval, every 2nd step, the eval step 3, the last step


def test_jsonl_alone_trains_on_that_file_with_an_explicit_holdout_and_says_it_resumes(micro_base, tmp_path, capsys,
                                                                                       monkeypatch):
    import json

    import nanoseek.tasks

    monkeypatch.setattr(nanoseek.tasks, "TASKS", dict(nanoseek.tasks.TASKS))  # grpo registers the user's task

    path = tmp_path / "user.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {a} plus 1?", "answer": str(a + 1)}) + "\n"
                            for a in range(12)))
    seen = []

    def record(prompts, completions, task, **kw):  # TRL's batched signature: columns arrive as lists
        seen.extend(task)
        return [len(c) / 8 for c in completions]

    kw = dict(init_from=str(micro_base), out_dir=str(tmp_path / "run"), jsonl=str(path), eval_fraction=0.25,
              thinking=False, prompts_per_step=2, num_generations=2, max_tokens=6, eval_every=100, eval_problems=8,
              tensorboard=False, save_every=100, reward_weights={"accuracy": 1.0}, adam_beta1=0.8, adam_epsilon=1e-6)
    out = grpo(GRPOConfig(steps=1, **kw), extra_rewards={"record": record})
    assert seen and set(seen) == {"jsonl:user"}  # no arithmetic mixed in
    m = read_metrics(out.parent)
    assert [r["step"] for r in m if "eval_accuracy" in r] == [0, 1]  # the 3 held-out lines, bare answers accepted
    capsys.readouterr()
    grpo(GRPOConfig(steps=2, **kw), extra_rewards={"record": record})
    assert f"resuming grpo from step 1 in {tmp_path / 'run'}" in capsys.readouterr().err
    st = torch.load(tmp_path / "run" / "checkpoints" / "step_0000002" / "trainer_state.pt", weights_only=True)
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in st["optimizer"]["param_groups"])


def test_a_non_finite_gradient_stops_grpo_naming_the_step(micro_base, tmp_path, monkeypatch):
    """A NaN gradient at the third step stops the run with a NonFiniteError naming stage grpo and step 2 (0-based:
    the step about to be taken) before anything non-finite is stepped; nothing is published."""
    from nanoseek.train import common as C

    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def poisoned(params, max_norm, *a, **k):  # the third optimizer step sees a NaN gradient norm
        calls.append(1)
        n = real(params, max_norm, *a, **k)
        return n * float("nan") if len(calls) == 3 else n

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    cfg = GRPOConfig(init_from=str(micro_base), out_dir=str(tmp_path / "nan"), steps=4, prompts_per_step=2,
                     num_generations=2, max_tokens=4, reward_weights={}, eval_every=0, tensorboard=False,
                     save_every=1, skip_zero_advantage=False)
    with pytest.raises(C.NonFiniteError) as e:
        grpo(cfg, extra_rewards={"r": lambda prompt, completion, problem: random.random()})
    assert e.value.stage == "grpo" and e.value.step == 2 and "grad_norm" in str(e.value)
    assert not (tmp_path / "nan" / "model").exists()
