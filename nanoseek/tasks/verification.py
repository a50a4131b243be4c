"""Self-verification tasks (DeepSeekMath-V2): score a worked solution against a rubric, and check a
verification. They make the verifier and the meta-verifier trainable with the same SFT / GRPO / eval
machinery as every other task (`verify_<task>` and `metaverify_<task>` are registered for the built-ins).

Rubric (the paper's three levels, for worked solutions with a final answer):
  1   the final answer is right and every step is right;
  0.5 the final answer is right, but a step has an error or a gap;
  0   the final answer is wrong.
The verifier writes its analysis (inside <think> with the thinking template) and gives the score as the
final answer (`The answer is 0.5.` or `\\boxed{0.5}`). The meta-verifier reads a solution together with a
verification and scores the verification: 1 if its score is the right one for the solution, else 0.

Problems are synthesised from the base task's own worked solutions, so their gold scores are known:
the solution kept as it is (1), with one number (or knight/knave, yes/no word) changed in an intermediate
line (0.5), or with the final answer replaced by a wrong one (0). A derived problem belongs to the split
of its base problem (`split_task`), so no held-out base problem is ever shown, solved, in training.
"""

from __future__ import annotations

import random
import re

from .base import Problem, Task, answer_line, parse_int

SCORES = (0.0, 0.5, 1.0)

VERIFY_PROMPT = {
    "en": ("Here is a problem and a worked solution.\n\nProblem: {problem}\n\nSolution:\n{solution}\n\n"
           "Check the solution step by step and score it: 1 if every step and the final answer are right, "
           "0.5 if the final answer is right but a step has an error or a gap, 0 if the final answer is wrong. "
           "Give the score as the final answer."),
    "zh": ("下面是一道题和一份解答。\n\n题目：{problem}\n\n解答：\n{solution}\n\n"
           "逐步检查这份解答并打分：每一步和最终答案都对给 1 分；最终答案对但某一步有错误或遗漏给 0.5 分；"
           "最终答案错给 0 分。把分数作为最终答案。"),
}
META_PROMPT = {
    "en": ("Here is a problem, a worked solution and a verification of that solution.\n\nProblem: {problem}\n\n"
           "Solution:\n{solution}\n\nVerification:\n{verification}\n\n"
           "Is the verification right? Score it 1 if the score it gives is the right one for this solution "
           "(1: all correct, 0.5: right answer with a flawed step, 0: wrong answer), otherwise 0. "
           "Give the score as the final answer."),
    "zh": ("下面是一道题、一份解答和对这份解答的评审。\n\n题目：{problem}\n\n解答：\n{solution}\n\n评审：\n{verification}\n\n"
           "这份评审对吗？如果它给的分数对这份解答是正确的（1：全对，0.5：答案对但某一步有错，0：答案错）就给 1 分，"
           "否则给 0 分。把分数作为最终答案。"),
}
REFINE_PROMPT = {
    "en": ("Problem: {problem}\n\nA previous solution:\n{solution}\n\nA review of it:\n{verification}\n\n"
           "Solve the problem again, fixing the issues the review points out."),
    "zh": "题目：{problem}\n\n之前的解答：\n{solution}\n\n对它的评审：\n{verification}\n\n请重新解这道题，改正评审指出的问题。",
}

_SWAPS = [("knight", "knave"), ("Yes", "No"), ("骑士", "骗子"), ("是", "否")]


def parse_score(text: str | None) -> float | None:
    """A rubric score (0, 0.5 or 1) from an extracted answer such as '0.5', '1/2', '.5', '1.0', '\\boxed{1}';
    None for anything else."""
    if text is None:
        return None
    t = text.strip().strip("$").strip()
    m = re.fullmatch(r"\\boxed\{(.*)\}", t)
    t = (m.group(1) if m else t).strip().rstrip(".。").replace(" ", "")
    if t in ("1/2", "½"):
        return 0.5
    if not re.fullmatch(r"\d?(\.\d{1,3})?|\d", t) or t in ("", "."):
        return None
    v = float(t)
    return v if v in SCORES else None


def solution_text(reasoning: str, answer: str, lang: str) -> str:
    """A worked solution as a verifier reads it: the reasoning lines, then the answer line."""
    return f"{reasoning}\n{answer_line(answer, lang)}"


def _corrupt_step(lines: list[str], rng: random.Random) -> tuple[int, str] | None:
    """(line index, changed line): one digit (or one knight/knave, yes/no word) changed in an intermediate line."""
    idx = list(range(1, len(lines) - 1)) or list(range(len(lines) - 1))
    rng.shuffle(idx)
    for i in idx:
        digits = [m.start() for m in re.finditer(r"\d", lines[i])]
        if digits:
            j = rng.choice(digits)
            d = rng.choice([c for c in "0123456789" if c != lines[i][j]])
            return i, lines[i][:j] + d + lines[i][j + 1:]
        for a, b in _SWAPS:
            for x, y in ((a, b), (b, a)):
                if x in lines[i]:
                    return i, lines[i].replace(x, y, 1)
    return None


def _wrong_answer(base: Task, problem: Problem, rng: random.Random) -> str:
    """A final answer the base verifier rejects: a nearby number for numeric answers, else another problem's."""
    n = parse_int(problem.answer)
    if n is not None and str(n) == problem.answer.strip():
        for _ in range(50):
            cand = str(n + rng.choice([-1, 1]) * rng.choice([1, 2, 10, 100, 9, 11]))
            if not base.verify(problem, cand):
                return cand
    for _ in range(200):
        cand = base.generate(rng, problem.level, problem.lang).answer
        if not base.verify(problem, cand):
            return cand
    raise ValueError(f"{base.name}: could not find a wrong answer for {problem.prompt!r}")


class VerificationTask(Task):
    """Score a worked solution of `base` against the rubric (see the module docstring)."""

    def __init__(self, base: Task):
        self.base = base
        self.name = f"verify_{base.name}"
        self.split_task = base.name  # a derived problem shares its base problem's train/test split
        self.levels = base.levels

    def candidate(self, rng: random.Random, level: int, lang: str) -> tuple[Problem, str, float, dict]:
        """A base problem, a candidate solution of it, the candidate's gold score and how it was made."""
        p = self.base.generate(rng, level, lang)
        reasoning, answer = self.base.solution(p)
        lines = reasoning.split("\n")
        kind = rng.choice(("correct", "step", "answer"))
        info: dict = {"kind": kind}
        if kind == "step":
            hit = _corrupt_step(lines, rng)
            if hit is None:
                kind = info["kind"] = "answer"
            else:
                i, bad = hit
                info.update(line=i, good=lines[i], bad=bad)
                lines[i] = bad
        if kind == "answer":
            info.update(claimed=_wrong_answer(self.base, p, rng), right=answer)
            answer = info["claimed"]
        score = {"correct": 1.0, "step": 0.5, "answer": 0.0}[kind]
        return p, solution_text("\n".join(lines), answer, lang), score, info

    def generate(self, rng: random.Random, level: int, lang: str) -> Problem:
        self.check(level, lang)
        p, sol, score, info = self.candidate(rng, level, lang)
        prompt = VERIFY_PROMPT[lang].format(problem=p.prompt, solution=sol)
        return Problem(self.name, level, lang, prompt, _fmt(score),
                       {"base": p.to_dict(), "solution": sol, "info": info, "key": self.base.key(p)})

    def verify(self, problem: Problem, answer_text: str) -> bool:
        return parse_score(answer_text) == float(problem.answer)

    def solution(self, problem: Problem) -> tuple[str, str]:
        """A worked verification: what is wrong (or that nothing is), then the score."""
        info = problem.meta["info"]
        right = self.base.solution(Problem.from_dict(problem.meta["base"]))[1]
        if info["kind"] == "correct":
            return _analysis("correct", problem.lang, shown=right), problem.answer
        if info["kind"] == "step":
            return _analysis("step", problem.lang, shown=right, bad=info["bad"], good=info["good"]), problem.answer
        return _analysis("answer", problem.lang, shown=info["claimed"], right=right), problem.answer


def _analysis(kind: str, lang: str, shown: str, right: str = "", bad: str = "", good: str = "") -> str:
    """The verification text arguing for score 1 ("correct"), 0.5 ("step") or 0 ("answer")."""
    zh = lang == "zh"
    if kind == "correct":
        return (f"逐步检查，每一步都对。最终答案 {shown} 正确。" if zh
                else f"Checking each step: all of them are right. The final answer {shown} is correct.")
    if kind == "step":
        return (f"这一步有错：“{bad}”，应为“{good}”。最终答案 {shown} 仍然正确。" if zh
                else f"This step is wrong: \"{bad}\"; it should be \"{good}\". The final answer {shown} is still correct.")
    return (f"正确答案是 {right}，解答给出的是 {shown}，最终答案错误。" if zh
            else f"The right answer is {right}, but the solution gives {shown}: the final answer is wrong.")


def _fmt(score: float) -> str:
    return "0.5" if score == 0.5 else str(int(score))


class MetaVerificationTask(Task):
    """Score a verification of a worked solution of `base`: 1 if its score is right, else 0.

    Half the verifications are the honest worked ones; the other half claim another score and argue for
    it (a made-up flawed step, a made-up right answer, or "all correct")."""

    def __init__(self, base: Task):
        self.inner = VerificationTask(base)
        self.name = f"metaverify_{base.name}"
        self.split_task = base.name
        self.levels = base.levels

    def generate(self, rng: random.Random, level: int, lang: str) -> Problem:
        self.check(level, lang)
        vp = self.inner.generate(rng, level, lang)
        base = Problem.from_dict(vp.meta["base"])
        true, info = vp.answer, vp.meta["info"]
        honest = rng.random() < 0.5
        if honest:
            analysis, claimed = self.inner.solution(vp)[0], true
        else:
            claimed = rng.choice([c for c in ("0", "0.5", "1") if c != true])
            shown = info["claimed"] if info["kind"] == "answer" else self.inner.base.solution(base)[1]
            lines = vp.meta["solution"].split("\n")[:-1]  # reasoning lines (the last line is the answer)
            if claimed == "1":
                analysis = _analysis("correct", lang, shown=shown)
            elif claimed == "0.5":
                hit = _corrupt_step(lines, rng) if len(lines) > 1 else None
                i, other = hit if hit is not None else (0, lines[0] + "?")
                analysis = _analysis("step", lang, shown=shown, bad=lines[i], good=other)
            else:
                fake = _wrong_answer(self.inner.base, base, rng)
                analysis = _analysis("answer", lang, shown=shown, right=fake if fake != shown else shown + "0")
        verification = solution_text(analysis, claimed, lang)
        prompt = META_PROMPT[lang].format(problem=base.prompt, solution=vp.meta["solution"], verification=verification)
        return Problem(self.name, level, lang, prompt, "1" if honest else "0",
                       {"verification_problem": vp.to_dict(), "verification": verification, "claimed": claimed,
                        "true": true, "key": vp.meta["key"]})

    def verify(self, problem: Problem, answer_text: str) -> bool:
        return parse_score(answer_text) == float(problem.answer)

    def solution(self, problem: Problem) -> tuple[str, str]:
        zh, claimed, true = problem.lang == "zh", problem.meta["claimed"], problem.meta["true"]
        analysis, _ = self.inner.solution(Problem.from_dict(problem.meta["verification_problem"]))
        if claimed == true:
            text = f"{analysis}\n评审给的 {claimed} 分是对的。" if zh else f"{analysis}\nThe verification's score {claimed} is right."
        else:
            text = (f"{analysis}\n所以应得 {true} 分，评审给的 {claimed} 分不对。" if zh
                    else f"{analysis}\nSo the score should be {true}; the verification's {claimed} is wrong.")
        return text, problem.answer
