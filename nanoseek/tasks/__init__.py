"""Embedded verifiable tasks (R1-style rule rewards) and their registry.

Built-in tasks: arithmetic, countdown, sorting, knights (levels 1..5, languages "en" and "zh"), and for
each of them the self-verification tasks verify_<task> and metaverify_<task> (nanoseek.tasks.verification);
multiplication, the task a calculator tool makes solvable (agentic RL; not in the embedded corpora).
Problems are generated, never stored; `make_problems(task, n, level, lang, seed, split)` is
deterministic given its arguments. The train/test split is by construction: a problem belongs to
"test" iff a stable hash of its language-free identity falls in 1 bucket of 8, and each split only
keeps its own problems, so no held-out problem is ever generated for training (or pre-training).
"""

from __future__ import annotations

import random

from .arithmetic import ArithmeticTask
from .base import LANGS, LEVELS, SPLITS, Problem, Task, answer_line, sample_problem, split_of
from .countdown import CountdownTask, check_expression
from .jsonl import JsonlTask, load_jsonl_task, math_equal, split_problems
from .knights import KnightsTask
from .multiplication import MultiplicationTask, tool_messages, tool_sft_records
from .sorting import SortingTask
from .verification import MetaVerificationTask, VerificationTask, parse_score

TASKS: dict[str, Task] = {t.name: t for t in (ArithmeticTask(), CountdownTask(), SortingTask(), KnightsTask())}
BUILTIN_TASKS = tuple(TASKS)  # the solving tasks (the embedded corpora draw from these by default)
for _base in list(TASKS.values()):  # DeepSeekMath-V2 self-verification: verifier and meta-verifier tasks
    for _derived in (VerificationTask(_base), MetaVerificationTask(_base)):
        TASKS[_derived.name] = _derived
VERIFICATION_TASKS = tuple(t for t in TASKS if t not in BUILTIN_TASKS)
# The tool task (agentic RL): reachable by name, but not in BUILTIN_TASKS, so the embedded corpora and `nanoseek
# run` stay as they were; its problems share arithmetic's split (nanoseek.tasks.multiplication).
TASKS[MultiplicationTask.name] = MultiplicationTask()


def get_task(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def register_task(task: Task, overwrite: bool = False) -> Task:
    """Make `task` (e.g. a load_jsonl_task result) reachable by name from get_task / the rewards."""
    if not task.name:
        raise ValueError("a task needs a non-empty name")
    if task.name in TASKS and TASKS[task.name] is not task and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered (pass overwrite=True)")
    TASKS[task.name] = task
    return task


def make_problems(task: str | Task, n: int, level: int = 1, lang: str = "en", seed: int = 0,
                  split: str = "train") -> list[Problem]:
    """`n` problems of one task, level and language; the same arguments give the same list."""
    t = get_task(task)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{t.name}|{level}|{lang}|{split}|{seed}")  # str seeds are stable across runs
    return [sample_problem(t, rng, level, lang, split) for _ in range(n)]


def verify_answer(problem: Problem, answer_text: str) -> bool:
    """Judge an extracted final answer with the problem's task verifier. Problems of unregistered
    tasks fall back to math_equal when their meta says verifier == "math", else exact match."""
    t = TASKS.get(problem.task)
    if t is not None:
        return bool(t.verify(problem, answer_text))
    if problem.meta.get("verifier") == "math":
        return math_equal(problem.answer, answer_text)
    return isinstance(answer_text, str) and answer_text.strip() == problem.answer.strip()


def solve(problem: Problem) -> tuple[str, str]:
    """(reasoning, answer) from the problem's task."""
    return get_task(problem.task).solution(problem)


__all__ = ["ArithmeticTask", "BUILTIN_TASKS", "CountdownTask", "JsonlTask", "KnightsTask", "LANGS", "LEVELS",
           "MultiplicationTask",
           "Problem", "SPLITS", "SortingTask", "TASKS", "Task", "answer_line", "check_expression", "get_task",
           "load_jsonl_task", "make_problems", "math_equal", "register_task", "sample_problem", "solve",
           "split_of", "split_problems", "tool_messages", "tool_sft_records", "verify_answer"]
