"""Embedded pre-training documents and cold-start SFT records built from the verifiable tasks.

Every document is one to three worked problems in one language: the problem, a short step-by-step
solution (the same chain of thought the tasks' `solution` returns), then the final-answer line.
Phrasing varies a little (several headers per language); a share of documents (`think_frac`) uses
the R1 layout `User: ... Assistant: <think> ... </think> The answer is X.` so that a base model has
seen the tags before R1-Zero-style RL. Only "train"-split problems are used, so held-out problems
(make_problems(..., split="test")) never leak into pre-training or SFT.

Answer convention (shared with nanoseek.train.rewards.extract_answer): the text after the
reasoning is exactly one line, `The answer is X.` in English or `答案是 X。` in Chinese, where X is
the task's canonical answer (an integer, an expression, a comma-separated list, or
"A: knight, B: knave"). See nanoseek.tasks.answer_line.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from nanoseek.tasks import BUILTIN_TASKS, LEVELS, Problem, Task, answer_line, get_task, sample_problem

_HEADERS = {
    "en": [("Problem: {p}\nSolution:\n{c}\n{a}"),
           ("Q: {p}\nA: Let's think step by step.\n{c}\n{a}"),
           ("Question: {p}\nWork:\n{c}\n{a}"),
           ("{p}\n{c}\n{a}")],
    "zh": [("题目：{p}\n解答：\n{c}\n{a}"),
           ("问：{p}\n答：我们一步一步来。\n{c}\n{a}"),
           ("问题：{p}\n过程：\n{c}\n{a}"),
           ("{p}\n{c}\n{a}")],
}
_THINK_DOC = "User: {p}\nAssistant: <think>\n{c}\n</think>\n{a}"


def worked_example(problem: Problem, template: str) -> str:
    """Render one problem with its solution into `template` ({p} prompt, {c} reasoning, {a} answer line)."""
    reasoning, answer = get_task(problem.task).solution(problem)
    return template.format(p=problem.prompt, c=reasoning, a=answer_line(answer, problem.lang))


def _check(n: int, langs: Sequence[str], tasks, levels: Sequence[int]) -> list[Task]:
    if n < 0:
        raise ValueError(f"the number of items must be >= 0, got {n}")
    if not langs or any(lang not in ("en", "zh") for lang in langs):
        raise ValueError(f"langs must be a non-empty subset of ('en', 'zh'), got {langs!r}")
    if not levels or any(lv not in LEVELS for lv in levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels!r}")
    names = BUILTIN_TASKS if tasks is None else tasks
    if isinstance(names, str):
        names = (names,)
    if not names:
        raise ValueError("tasks must not be empty")
    return [get_task(t) for t in names]


def _draw(rng: random.Random, tasks: list[Task], langs, levels, lang: str | None = None) -> Problem:
    task, level = rng.choice(tasks), rng.choice(levels)
    return sample_problem(task, rng, level, lang or rng.choice(langs), split="train")


def embedded_corpus(n_docs: int, seed: int = 0, langs: Sequence[str] = ("en", "zh"),
                    tasks: Sequence[str] | None = None, levels: Sequence[int] = LEVELS,
                    max_problems_per_doc: int = 3, think_frac: float = 0.25) -> list[str]:
    """`n_docs` plain-text documents of worked problems (deterministic given the arguments).

    tasks: task names (default: every built-in task); levels: drawn uniformly per problem (pass
    (1, 2) for a model of a few million parameters); think_frac: share of R1-layout documents.
    """
    task_objs = _check(n_docs, langs, tasks, levels)
    if max_problems_per_doc < 1 or not 0.0 <= think_frac <= 1.0:
        raise ValueError("need max_problems_per_doc >= 1 and 0 <= think_frac <= 1")
    rng = random.Random(f"corpus|{seed}")
    docs = []
    for _ in range(n_docs):
        lang = rng.choice(langs)
        k = rng.randint(1, max_problems_per_doc)
        template = _THINK_DOC if rng.random() < think_frac else rng.choice(_HEADERS[lang])
        parts = [worked_example(_draw(rng, task_objs, langs, levels, lang), template) for _ in range(k)]
        docs.append("\n\n".join(parts))
    return docs


def embedded_sft_records(n: int, seed: int = 0, langs: Sequence[str] = ("en", "zh"),
                         tasks: Sequence[str] | None = None, levels: Sequence[int] = LEVELS,
                         with_problem: bool = False) -> list[dict]:
    """`n` cold-start SFT chat records:
    {"messages": [{"role": "user", "content": prompt},
                  {"role": "assistant", "content": answer line, "reasoning_content": chain of thought}]}
    with_problem=True adds "problem": Problem.to_dict() so rewards can re-check the record.
    """
    task_objs = _check(n, langs, tasks, levels)
    rng = random.Random(f"sft|{seed}")
    out = []
    for _ in range(n):
        p = _draw(rng, task_objs, langs, levels)
        reasoning, answer = get_task(p.task).solution(p)
        rec = {"messages": [{"role": "user", "content": p.prompt},
                            {"role": "assistant", "content": answer_line(answer, p.lang),
                             "reasoning_content": reasoning}]}
        if with_problem:
            rec["problem"] = p.to_dict()
        out.append(rec)
    return out
