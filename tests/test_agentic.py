"""Agentic RL (nanoseek.train.agentic): multi-turn rollouts that run the model's tool calls.

The model is a real micro model whose sampler is scripted: `scripted` patches the engine's `sample` so that each
turn's tokens are forced from a script (the chosen token's log-prob is recomputed under the model's own sampling
distribution, its support extended to it), so rollouts call tools deterministically and the training forward can
still be checked against the sampler's log-probs."""

import math
import random

import pytest
import torch

import nanoseek
import nanoseek.engine.engine as engine_mod
from nanoseek.engine import Engine, SamplingParams, derive_seed
from nanoseek.engine.sampling import process_logits
from nanoseek.tasks import Problem, get_task, make_problems, sample_problem, split_of, tool_messages
from nanoseek.tokenizer import TOOL_CALLS_END, TOOL_OUTPUT_END, Tokenizer
from nanoseek.train import agentic
from nanoseek.train.evaluate import EvalConfig, prompt_ids, score_problems
from nanoseek.train.grpo import GRPOConfig, build_batch, grpo, policy_logprobs, rollout
from nanoseek.train.rewards import accuracy_reward, format_reward, language_consistency_reward

PROBLEM = Problem("multiplication", 1, "en", "What is 6 * 7?", "42", {"nums": [6, 7], "key": "6*7"})


def _conversation(answer_reasoning="The calculator gives 6 * 7 = 42."):
    msgs = tool_messages(PROBLEM)
    msgs[-1]["reasoning_content"] = answer_reasoning
    return msgs


def _turn_scripts(tok):
    """The generated turns of the demonstration, cut out of the chat template's own rendering: (prompt, turn 1
    up to the end-of-tool-calls token, turn 2 after the tool output's `<think>`, the full ids)."""
    full = tok.apply_chat_template(_conversation(), thinking=True, add_generation_prompt=False)
    prompt = prompt_ids(tok, PROBLEM, thinking=True)
    assert full[:len(prompt)] == prompt
    end = full.index(tok.tool_token_id(TOOL_CALLS_END))
    after = len(full) - 1 - full[::-1].index(tok.tool_token_id(TOOL_OUTPUT_END)) + 2  # past `<tool_output_end><think>`
    return prompt, full[len(prompt):end + 1], full[after:], full


@pytest.fixture
def scripted(monkeypatch):
    """scripted(turns): from now on a request whose prompt holds t tool outputs generates turns[min(t, last)]
    token by token (a turn past its script samples freely)."""
    real = engine_mod.sample
    state = {"turns": None, "seqs": None}
    real_append = engine_mod.Engine._sample_and_append

    def remember(self, seqs, logits, routing):
        state["seqs"] = seqs
        return real_append(self, seqs, logits, routing)

    def forced(logits, params, generators, return_support=False, top_n=0):
        res = real(logits, params, generators, return_support=return_support, top_n=top_n)
        for i, q in enumerate(state["seqs"]):
            done = q.handle.prompt_ids.count(state["out_end"])  # tool outputs so far: the turn
            turn = state["turns"][min(done, len(state["turns"]) - 1)]
            if len(q.tokens) >= len(turn):
                continue
            nxt = turn[len(q.tokens)]
            res.tokens[i] = nxt
            logp, support = process_logits(logits[i:i + 1], [params[i]], want_support=True)
            if res.support is not None:  # the forced token joins the support; log-prob over that support
                res.support[i] = support[0]
                res.support[i, nxt] = True
                scaled = logits[i].float() / (params[i].temperature or 1.0)
                logp = scaled.masked_fill(~res.support[i], -math.inf).log_softmax(-1).unsqueeze(0)
            res.logprobs[i] = logp[0, nxt]
        return res

    def install(turns, tok):
        state["turns"], state["out_end"] = turns, tok.tool_token_id(TOOL_OUTPUT_END)
        monkeypatch.setattr(engine_mod, "sample", forced)
        monkeypatch.setattr(engine_mod.Engine, "_sample_and_append", remember)

    return install


def _cfg(base, **kw):
    kw = {"prompts_per_step": 1, "num_generations": 2, "max_tokens": 160, "temperature": 0.9, "tools": ["calculator"],
          "max_tool_turns": 2, **kw}
    return GRPOConfig(init_from=str(base), **kw)


def test_a_tool_call_runs_and_generation_continues_exactly_as_the_template_renders_it(micro_base, scripted):
    tok = Tokenizer.load(micro_base)
    model = nanoseek.from_pretrained(micro_base)
    prompt, turn1, turn2, full = _turn_scripts(tok)
    scripted([turn1, turn2], tok)
    seqs = rollout(model, tok, _cfg(micro_base), [PROBLEM], step=0)["seqs"]
    for s in seqs:
        c = s["completion"]
        assert prompt + c.token_ids == full  # the tool turn is the template's, token for token
        assert c.tool_calls == [{"name": "calculator", "arguments": '{"expression": "6 * 7"}', "output": "42"}]
        assert c.tool_turns == 1 and c.finish_reason == "stop"
        # loss mask: generated tokens 1; the EOS closing the calling turn, the tool output and `<think>` 0
        _, template_mask = tok.encode_chat_with_mask(_conversation(), thinking=True)
        tool_turn = len(prompt) + len(turn1) + torch.arange(len(full) - len(prompt) - len(turn1) - len(turn2))
        expected = torch.tensor(template_mask[len(prompt):])
        expected[tool_turn - len(prompt)] = 0
        assert c.loss_mask == expected.tolist()
        assert sum(c.loss_mask) == len(turn1) + len(turn2)
        assert accuracy_reward(c.text, PROBLEM) == 1.0 and format_reward(c.text) == 1.0
    # the batch the trainer builds carries that mask
    batch = build_batch(seqs, tok.pad_id, 0, 1, keep_mask=False, keep_routing=False)
    assert batch["mask"][0].tolist()[:len(full) - len(prompt)] == seqs[0]["completion"].loss_mask
    assert batch["mask"][0, len(full) - len(prompt):].sum() == 0


def test_turn_limit_and_budget_end_the_rollout(micro_base, scripted):
    tok = Tokenizer.load(micro_base)
    model = nanoseek.from_pretrained(micro_base)
    _, turn1, _, _ = _turn_scripts(tok)
    scripted([turn1], tok)  # calls the calculator in every turn
    for limit in (1, 2, 3):
        c = rollout(model, tok, _cfg(micro_base, max_tool_turns=limit, max_tokens=300), [PROBLEM],
                    step=0)["seqs"][0]["completion"]
        assert c.tool_turns == limit and len(c.tool_calls) == limit
        assert c.token_ids[-1] == tok.tool_token_id(TOOL_CALLS_END) and c.finish_reason == "stop"
        assert sum(c.loss_mask) == (limit + 1) * len(turn1)
    # a budget that the tool output does not fit in: the call ran, nothing is appended, finish "length"
    c = rollout(model, tok, _cfg(micro_base, max_tokens=len(turn1) + 3), [PROBLEM], step=0)["seqs"][0]["completion"]
    assert c.token_ids == turn1 and c.finish_reason == "length" and c.tool_turns == 0


def test_keep_routing_and_sampling_mask_stay_aligned_across_turns(micro_base, scripted):
    """The training forward with the replayed experts and support masks reproduces the sampler's log-prob of
    every generated token of every turn; the tool turn's positions are replayed from the next turn's prefill."""
    from oracle import random_model, tiny_config

    tok = Tokenizer.load(micro_base)
    model = random_model(tiny_config(vocab_size=tok.vocab_size), seed=4)
    _, turn1, turn2, full = _turn_scripts(tok)
    scripted([turn1, turn2], tok)
    cfg = _cfg(micro_base, top_k=5)
    seqs = rollout(model, tok, cfg, [PROBLEM], step=0)["seqs"]
    moe = sum(1 for layer in model.model.layers[: model.config.num_hidden_layers] if layer.is_moe)
    batch = build_batch(seqs, tok.pad_id, moe, model.config.num_experts_per_tok, True, True)
    c, lp = seqs[0]["completion"], len(seqs[0]["prompt"])
    L = len(c.token_ids)
    assert c.sampling_masks.shape == (L, model.config.vocab_size) and c.routing.shape[0] == L
    assert len(c.logprobs) == len(c.loss_mask) == L
    tool = [j for j in range(L) if not c.loss_mask[j]]
    assert c.sampling_masks[tool].all() and not c.sampling_masks[[j for j in range(L) if c.loss_mask[j]]].all()
    for r in batch["routing"]:  # every position that fed the sampler is forced, nothing past it
        assert (r[0, :lp - 1 + L] >= 0).all() and (r[0, lp - 1 + L:] == -1).all()
    rows = torch.arange(len(seqs))
    with torch.no_grad():
        logp, _ = policy_logprobs(model, batch, rows, cfg.temperature, forced=True, sampling_mask=True)
    m = batch["mask"].bool()
    assert m.sum() == 2 * (len(turn1) + len(turn2))
    assert (logp - batch["old"])[m].abs().max() < 1e-4


def test_grpo_step_with_tools_trains_with_a_finite_loss(micro_base, scripted, tmp_path):
    tok = Tokenizer.load(micro_base)
    _, turn1, _, _ = _turn_scripts(tok)
    scripted([turn1, []], tok)  # the call is scripted, the answer turn is sampled
    cfg = _cfg(micro_base, out_dir=str(tmp_path / "g"), prompts_per_step=2, num_generations=3, steps=1, max_tokens=120,
               lr=1e-4, eval=False, tensorboard=False, tasks=["multiplication"])
    grpo(cfg, extra_rewards={"chars": lambda p, c, prob: len(c) % 5})
    from nanoseek.train.common import read_metrics

    rec = [r for r in read_metrics(tmp_path / "g" / "metrics.jsonl") if "loss" in r][-1]
    assert math.isfinite(rec["loss"]) and rec["loss"] != 0 and math.isfinite(rec["grad_norm"]), rec
    assert rec["tool_calls"] == 1.0 and rec["tool_turns"] == 1.0 and rec["tool_error_frac"] == 0.0


def test_max_tool_turns_0_is_the_single_turn_rollout(micro_base):
    """Without tools the rollout is the engine's plain generate with one seed per problem; with tools on, a model
    that never calls one samples the very same tokens (turn 0 keeps its seeds)."""
    tok = Tokenizer.load(micro_base)
    model = nanoseek.from_pretrained(micro_base)
    rng = random.Random(0)
    problems = [sample_problem(get_task("arithmetic"), rng, 1, "en") for _ in range(3)]
    cfg = GRPOConfig(init_from=str(micro_base), prompts_per_step=3, num_generations=4, max_tokens=12, temperature=0.9)
    seqs = rollout(model, tok, cfg, problems, step=5)["seqs"]
    prompts = [prompt_ids(tok, p, True) for p in problems]
    moe = any(getattr(layer, "is_moe", False) for layer in model.model.layers)
    engine = Engine(model, tok, max_batch_size=12, max_len=max(map(len, prompts)) + 13)
    outs = engine.generate(prompts, [SamplingParams(max_tokens=12, temperature=0.9, n=4, logprobs=True,
                                                    return_routing=moe, seed=derive_seed(0, 5, 0, j))
                                     for j in range(3)])
    direct = [c for o in outs for c in o.outputs]
    for field in ("token_ids", "logprobs", "text", "finish_reason"):
        assert [getattr(s["completion"], field) for s in seqs] == [getattr(c, field) for c in direct]
    assert not any(isinstance(s["completion"], agentic.ToolCompletion) for s in seqs)
    tooled = rollout(model, tok, _cfg(micro_base, prompts_per_step=3, num_generations=4, max_tokens=12), problems,
                     step=5)["seqs"]
    assert all(s["completion"].tool_turns == 0 for s in tooled)
    assert [s["completion"].token_ids for s in tooled] == [c.token_ids for c in direct]
    assert [s["completion"].logprobs for s in tooled] == [c.logprobs for c in direct]
    assert [s["completion"].text for s in tooled] == [c.text for c in direct]


def test_eval_with_tools_scores_the_final_turn(micro_base, scripted):
    tok = Tokenizer.load(micro_base)
    model = nanoseek.from_pretrained(micro_base)
    _, turn1, turn2, _ = _turn_scripts(tok)
    scripted([turn1, turn2], tok)
    use = agentic.tool_use(["calculator"], 1, True)
    r = score_problems(model, tok, [PROBLEM], k=2, temperature=0.0, max_tokens=160, tools=use)
    assert r["pass@1"] == 1.0 and r["format_rate"] == 1.0 and "42" in r["transcripts"][0]["completion"]
    off = score_problems(model, tok, [PROBLEM], k=1, temperature=0.0, max_tokens=160)  # the call goes unanswered
    assert off["pass@1"] == 0.0


def test_rewards_read_a_tool_transcript_turn_by_turn():
    calls = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>calculator<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    out = "<｜tool▁output▁begin｜>42<｜tool▁output▁end｜>"
    good = f"need 6 * 7</think>{calls}{out}<think>so it is 42</think>The answer is 42."
    assert accuracy_reward(good, PROBLEM) == 1.0 and format_reward(good) == 1.0
    early = f"The answer is 42.</think>{calls}{out}<think>hmm</think>no idea"  # only in the first turn's reasoning
    assert accuracy_reward(early, PROBLEM) == 0.0
    mixed = f"need 6 * 7</think>{calls}{out}<think>计算器算出四十二</think>The answer is 42."
    assert language_consistency_reward(mixed, "en") == pytest.approx(1 / 9)  # every turn's reasoning counts


@pytest.mark.parametrize("kw, match", [
    (dict(tools=["abacus"], max_tool_turns=1), "unknown tool 'abacus'"),
    (dict(tools=["calculator"], max_tool_turns=-1), "max_tool_turns must be an integer >= 0"),
    (dict(max_tool_turns=2), "needs tools"),
    (dict(tools=["calculator"]), "need max_tool_turns >= 1"),
    (dict(tools=["calculator"], max_tool_turns=1, prompt_format="raw"), "prompt_format='chat'"),
])
def test_bad_tool_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kw)
    with pytest.raises(ValueError, match=match):
        EvalConfig(**kw)


def test_cli_has_the_tool_options(capsys):
    from nanoseek.cli import build_parser

    for command in ("grpo", "eval"):
        with pytest.raises(SystemExit):
            build_parser(command).parse_args([command, "--help"])
        text = capsys.readouterr().out
        for flag in ("--tools", "--max-tool-turns", "--tool-schemas"):
            assert flag in text, (command, flag)
    args = build_parser("grpo").parse_args(["grpo", "--tools", "calculator", "--max-tool-turns", "2"])
    assert args.tools == ["calculator"] and args.max_tool_turns == 2


def test_multiplication_needs_the_tool_and_shares_arithmetic_split():
    task = get_task("multiplication")
    for p in make_problems("multiplication", 30, 3, "en", seed=0, split="test"):
        a, b = p.meta["nums"]
        assert 100 <= a <= 999 and 10 <= b <= 99 and p.answer == str(a * b)
        assert split_of("arithmetic", f"{a}*{b}") == "test"
        msgs = tool_messages(p)
        assert msgs[2] == {"role": "tool", "content": p.answer}
        assert task.verify(p, p.answer) and not task.verify(p, str(a * b + 1))
        assert msgs[3]["content"] == f"The answer is {p.answer}."


def test_tool_schemas_put_the_tools_section_into_the_prompt(micro_base):
    from nanoseek.tools import tool_schemas

    tok = Tokenizer.load(micro_base)
    on, off = agentic.tool_use(["calculator"], 1, True, schemas=True), agentic.tool_use(["calculator"], 1, True)
    assert agentic.prompt_tools(on) == tool_schemas(["calculator"]) and agentic.prompt_tools(off) is None
    assert agentic.tool_use([], 0, True) is None
    with_section = prompt_ids(tok, PROBLEM, True, tools=agentic.prompt_tools(on))
    assert "## Tools" in tok.decode(with_section) and "## Tools" not in tok.decode(prompt_ids(tok, PROBLEM, True))
