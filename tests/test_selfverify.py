"""Self-verification (DeepSeekMath-V2): the verifier / meta-verifier tasks, the rewards, and the
generate -> verify -> refine loop."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from nanoseek.tasks import BUILTIN_TASKS, Problem, get_task, make_problems, split_of
from nanoseek.tasks.verification import parse_score
from nanoseek.train.selfverify import (generator_reward, predicted_score, self_refine, summarize,
                                       verification_reward)


# ----------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("base", BUILTIN_TASKS)
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_verification_problems_carry_the_gold_score_of_their_candidate(base, lang):
    bt, vt = get_task(base), get_task(f"verify_{base}")
    kinds = set()
    for p in make_problems(vt, 24, level=2, lang=lang, seed=1):
        info, bp = p.meta["info"], p.meta["base"]
        bp = Problem.from_dict(bp)
        reasoning, right = bt.solution(bp)
        shown_lines = p.meta["solution"].split("\n")
        kinds.add(info["kind"])
        if info["kind"] == "correct":
            assert p.answer == "1" and shown_lines[:-1] == reasoning.split("\n")
        elif info["kind"] == "step":  # exactly one intermediate line differs; the final answer is still right
            diff = [i for i, (a, b) in enumerate(zip(shown_lines[:-1], reasoning.split("\n"))) if a != b]
            assert p.answer == "0.5" and diff == [info["line"]]
            assert bt.verify(bp, right)
        else:
            assert p.answer == "0" and not bt.verify(bp, info["claimed"])
            assert info["claimed"] in shown_lines[-1]
        assert bp.prompt in p.prompt and p.meta["solution"] in p.prompt
        r, a = vt.solution(p)  # the worked verification gives the gold score
        assert a == p.answer and vt.verify(p, a) and r
    assert kinds == {"correct", "step", "answer"}


@pytest.mark.parametrize("base", ["arithmetic", "knights"])
def test_meta_verification_gold_is_whether_the_claimed_score_is_right(base):
    mt = get_task(f"metaverify_{base}")
    seen = set()
    for p in make_problems(mt, 30, level=2, lang="en", seed=2):
        honest = p.meta["claimed"] == p.meta["true"]
        seen.add(honest)
        assert p.answer == ("1" if honest else "0")
        assert p.meta["verification"] in p.prompt
        assert parse_score(p.meta["verification"].split("The answer is ")[-1]) == float(p.meta["claimed"])
        assert mt.verify(p, mt.solution(p)[1])
    assert seen == {True, False}


@pytest.mark.parametrize("name", ["verify_arithmetic", "metaverify_sorting"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_derived_problems_share_their_base_problems_split(name, split):
    t = get_task(name)
    for p in make_problems(t, 20, level=2, lang="en", seed=3, split=split):
        assert split_of(t.split_task, p.meta["key"]) == split
        base = p.meta["base"] if "base" in p.meta else p.meta["verification_problem"]["meta"]["base"]
        assert split_of(base["task"], get_task(base["task"]).key(Problem.from_dict(base))) == split


@pytest.mark.parametrize("text,want", [
    ("1", 1.0), ("0", 0.0), ("0.5", 0.5), (".5", 0.5), ("1/2", 0.5), ("1.0", 1.0), ("\\boxed{0.5}", 0.5),
    ("$1$", 1.0), ("0.50", 0.5), ("2", None), ("0.7", None), ("-1", None), ("", None), (None, None),
    ("one", None), ("1 or 0", None), ("9" * 500, None), ("00", None),
])
def test_parse_score(text, want):
    assert parse_score(text) == want


# ----------------------------------------------------------------------------- rewards
def test_verification_reward_is_format_times_closeness():
    p = make_problems("verify_arithmetic", 12, level=2, seed=4)
    half = next(q for q in p if q.answer == "0.5")
    assert verification_reward("", "checked</think>The answer is 0.5.", half) == 1.0
    assert verification_reward("", "checked</think>The answer is 1.", half) == 0.5
    assert verification_reward("", "checked</think>The answer is 0.", half) == 0.5
    assert verification_reward("", "checked</think>\\boxed{1/2}", half) == 1.0
    assert verification_reward("", "checked</think>The answer is 7.", half) == 0.0  # not a rubric score
    assert verification_reward("", "checked, the answer is 0.5", half) == 0.0  # no </think>: no answer region
    assert verification_reward("", "a</think>b</think>The answer is 0.5.", half) == 0.0  # malformed: format 0
    assert predicted_score("x</think>The answer is 1. Then the answer is 0.") == 0.0  # the last answer counts


def test_generator_reward_weights_solution_score_and_self_evaluation():
    good = "work</think>The answer is 12. Self-score: 1"
    assert generator_reward(good, 1.0) == pytest.approx(1.0)
    assert generator_reward(good, 0.0) == pytest.approx(0.0)  # 0.76 * 0 + 0.24 * (1 - 1)
    assert generator_reward("work</think>The answer is 12. Self-score: 0", 1.0) == pytest.approx(0.76)
    assert generator_reward("work</think>The answer is 12. 自评：0.5", 0.5) == pytest.approx(0.76 * 0.5 + 0.24)
    assert generator_reward("work</think>The answer is 12.", 1.0) == pytest.approx(0.76)  # no self score
    assert generator_reward("no think tags, Self-score: 1", 1.0) == 0.0  # format gate


# ----------------------------------------------------------------------------- the loop
class ScriptedEngine:
    """An Engine stand-in: the 'tokenizer' remembers each rendered prompt, `respond(prompt, i)` answers."""

    def __init__(self, respond):
        self.respond, self.prompts, self.calls = respond, {}, []
        eng = self

        class Tok:
            def apply_chat_template(self, messages, thinking=False, add_generation_prompt=True):
                key = len(eng.prompts)
                eng.prompts[key] = messages[-1]["content"]
                return [key]

        self.tokenizer = Tok()

    def generate(self, ids, params):
        outs = []
        for x in ids:
            prompt = self.prompts[x[0]]
            self.calls.append(prompt)
            texts = [self.respond(prompt, i) for i in range(params.n)]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=t) for t in texts]))
        return outs


def arithmetic_problem():
    p = make_problems("arithmetic", 1, level=1, seed=5, split="test")[0]
    a, b = p.meta["nums"]
    return p, a + b


def test_loop_refines_until_the_verifier_is_satisfied_and_keeps_the_best():
    p, right = arithmetic_problem()
    wrong = right + 1

    def respond(prompt, i):
        if prompt.startswith("Here is a problem"):  # verification: score by the answer shown
            return f"check</think>The answer is {1 if f'answer is {right}.' in prompt else 0}."
        if prompt.startswith("Problem:"):  # refinement
            return f"fixed</think>The answer is {right}."
        return f"guess</think>The answer is {wrong}."

    eng = ScriptedEngine(respond)
    [res] = self_refine(eng, [p], rounds=4, n_verify=3)
    assert [r.score for r in res.rounds] == [0.0, 1.0]  # stopped once verified, well before 4 rounds
    assert [r.correct for r in res.rounds] == [False, True]
    assert res.best == 1 and res.answer == str(right)
    assert len(res.rounds[0].verifications) == 3 and res.rounds[0].meta_scores is None
    refine = [c for c in eng.calls if c.startswith("Problem:")]
    assert len(refine) == 1 and "check" in refine[0] and f"answer is {wrong}" in refine[0]
    s = summarize([res])
    assert s["accuracy_best_by_round"] == [0.0, 1.0] and s["accuracy_latest_by_round"] == [0.0, 1.0]
    assert s["verifier_agreement"] == 1.0


def test_meta_verifier_drops_untrusted_verifications():
    p, right = arithmetic_problem()

    def respond(prompt, i):
        if prompt.startswith("Here is a problem, a worked solution and a verification"):  # meta: trust only "1"s
            return f"meta</think>The answer is {1 if 'The answer is 1.' in prompt.split('Verification:')[1] else 0}."
        if prompt.startswith("Here is a problem"):
            return f"v{i}</think>The answer is {1 if i == 0 else 0}."  # one fair verification, one harsh one
        return f"solve</think>The answer is {right}."

    [plain] = self_refine(ScriptedEngine(respond), [p], rounds=1, n_verify=2)
    [meta] = self_refine(ScriptedEngine(respond), [p], rounds=1, n_verify=2, meta_verify=True)
    assert plain.rounds[0].score == 0.5 and len(plain.rounds) == 2  # the harsh review triggers a refinement
    assert meta.rounds[0].meta_scores == [1.0, 0.0] and meta.rounds[0].score == 1.0 and len(meta.rounds) == 1


def test_unreadable_verifications_score_zero_and_plain_prompts_work():
    eng = ScriptedEngine(lambda prompt, i: "rambling without a score")
    res = self_refine(eng, ["What is 2 + 2?", "2 加 2 等于多少？"], rounds=2, n_verify=2, lang="en")
    assert all(len(r.rounds) == 3 for r in res)
    assert all(rd.scores == [None, None] and rd.score == 0.0 and rd.correct is None for r in res for rd in r.rounds)
    with pytest.raises(ValueError, match="n_verify"):
        self_refine(eng, ["x"], n_verify=0)


def test_self_refine_command_on_a_real_model(micro_base, tmp_path):
    """The whole path on a real (barely trained) model: engine, template, JSON output."""
    from nanoseek.cli import main

    out = tmp_path / "refine.json"
    assert main(["self-refine", "--model", str(micro_base), "--num-problems", "2", "--rounds", "1",
                 "--n-verify", "2", "--meta-verify", "--max-tokens", "12", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["summary"]["problems"] == 2 and len(res["problems"]) == 2
    for p in res["problems"]:
        for rd in p["rounds"]:
            assert len(rd["verifications"]) == 2 and len(rd["meta_scores"]) == 2
            assert isinstance(rd["correct"], bool)
    assert main(["self-refine", "--model", str(micro_base), "--tasks", "verify_arithmetic"]) == 2  # named error


def test_model_judge_scores_against_the_rubric_and_plugs_into_rewards():
    from nanoseek.train.rewards import combine_rewards
    from nanoseek.train.selfverify import ModelJudge

    def respond(prompt, i):  # a judge that likes polite responses, and sometimes rambles without a score
        if i == 1 and "ramble" in prompt:
            return "hmm"
        return f"judged</think>The answer is {1 if 'please' in prompt.split('Response:')[1] else 0}."

    eng = ScriptedEngine(respond)
    judge = ModelJudge(eng, rubric="Be polite.", n=2)
    assert judge.score_batch(["ask", "ask"], ["x</think>please sit", "x</think>sit"]) == [1.0, 0.0]
    assert judge("ask", "x</think>please ramble") == 0.5  # one unreadable judgement of two counts 0
    assert all(c.startswith("Rubric:\nBe polite.") for c in eng.calls)
    reward = combine_rewards({"format": 0.0, "judge": 2.0}, {"judge": judge})
    assert reward("ask", "x</think>please sit", None).total == 2.0
    per_problem = ModelJudge(eng, n=1)
    assert per_problem("ask", "x</think>please", {"rubric": "Say please."}) == 1.0
    assert "Say please." in eng.calls[-1]
    with pytest.raises(ValueError, match="rubric"):
        per_problem("ask", "x</think>please", None)
