"""User-supplied tasks from JSONL, checked with math-verify.

Each non-blank line is an object with "prompt" and "answer" (any JSON scalar, stored as a string)
and optionally "lang" ("en"/"zh"), "level" (int), "reasoning" (a worked chain of thought used by
`solution`, else it is empty). Every other key is an extra column, kept in `Problem.meta["columns"]`
(what a TRL-style reward receives as a keyword argument). With require_answer=False (rewards that read
their own columns) "answer" may be missing (stored as ""). Errors name the file and line.

Held-out split: a file is never split behind the user's back. `split_problems(problems, fraction, seed)`
holds out an explicit fraction (a seeded shuffle, at least one problem each side); GRPO uses it for
`eval_fraction`, or takes a separate `eval_jsonl` file. Answers are compared by
`math_equal(gold, predicted)`: cheap exact/integer checks first, then math-verify's
`verify(parse(gold), parse(pred))` (so "\\frac{1}{2}" matches "0.5"). math-verify is imported
lazily (it is the optional `rl` extra); without it only the cheap checks run. Every failure mode of
math-verify (exceptions, empty parses, over-long input, its signal-based timeout outside the main
thread) gives False, never an exception; predictions that would make sympy run for minutes (power
towers, exponents of 4+ digits, big factorials, `**`) are refused before parsing.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading

from .base import LANGS, Problem, Task, parse_int

MAX_MATH_CHARS = 400  # longer strings are not compared by sympy (time and memory bound)
_TIMEOUT_S = 5


def _normalise(s: str) -> str:
    s = s.strip().strip("$").strip()
    if s.startswith("\\boxed{") and s.endswith("}"):
        s = s[len("\\boxed{"):-1]
    return "".join(s.split()).rstrip(".。")


def _mv_parse(parse, s: str, timeout):
    # bare LaTeX such as "1+x" only parses fully inside $...$ (raw, math-verify reads just "1")
    for cand in (s,) if ("$" in s or "\\boxed" in s) else (f"${s}$", s):
        try:
            out = parse(cand, parsing_timeout=timeout)
        except Exception:
            out = []
        if out:
            return out
    return []


# power towers, huge exponents and big factorials make sympy run for minutes, and outside the main
# thread math-verify has no timeout: such predictions are refused before parsing
_RISKY_RE = re.compile(r"\^\s*\{[^}]*\^|\^\s*\([^)]*\^|\^\s*\w+\s*\^|\^\s*\{?\s*\d{4,}|\*\*|\d{4,}\s*!|!\s*!")


def _quiet_math_verify() -> None:
    # math-verify logs warnings (e.g. "Timeout is disabled") that would reach stderr through
    # logging's last-resort handler; a NullHandler keeps the library silent unless logging is set up
    logger = logging.getLogger("math_verify")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


def math_equal(gold: str, pred: str) -> bool:
    """True iff `pred` denotes the same mathematical answer as `gold` (never raises)."""
    if not isinstance(gold, str) or not isinstance(pred, str):
        return False
    g, p = _normalise(gold), _normalise(pred)
    if not g or not p or len(p) > MAX_MATH_CHARS or len(g) > MAX_MATH_CHARS:
        return False
    if g == p:
        return True
    gi, pi = parse_int(g), parse_int(p)
    if gi is not None and pi is not None:
        return gi == pi
    if _RISKY_RE.search(pred):
        return False
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    _quiet_math_verify()
    # math-verify's timeout uses signal.alarm, which only works in the main thread
    timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gp, pp = _mv_parse(parse, gold.strip(), timeout), _mv_parse(parse, pred.strip(), timeout)
    if not gp or not pp:
        return False
    try:
        return bool(verify(gp, pp, timeout_seconds=timeout))
    except Exception:
        return False


class JsonlTask(Task):
    """A fixed list of problems; `generate` draws one of them (preferring the requested level)."""

    def __init__(self, name: str, problems: list[Problem]):
        if not problems:
            raise ValueError(f"{name}: no problems")
        self.name = name
        self.problems = problems
        self.levels = tuple(sorted({p.level for p in problems} | {1, 2, 3, 4, 5}))
        self._by_level: dict[int, list[Problem]] = {}  # level -> its problems, built once (a draw is O(1))
        for p in problems:
            self._by_level.setdefault(p.level, []).append(p)

    def generate(self, rng: random.Random, level: int, lang: str) -> Problem:
        pool = self._by_level.get(level) or self.problems
        p = rng.choice(pool)
        return Problem(p.task, p.level, p.lang, p.prompt, p.answer, dict(p.meta))

    def verify(self, problem: Problem, answer_text: str) -> bool:
        return math_equal(problem.answer, answer_text)

    def solution(self, problem: Problem) -> tuple[str, str]:
        return problem.meta.get("reasoning", ""), problem.answer

    def key(self, problem: Problem) -> str:
        return problem.prompt


_KNOWN_KEYS = ("prompt", "answer", "lang", "level", "reasoning")


def load_jsonl_task(path: str, name: str | None = None, lang: str = "en", require_answer: bool = True) -> JsonlTask:
    """Read {"prompt", "answer", [lang, level, reasoning], [extra columns]} lines into a JsonlTask named
    `name` (default "jsonl:<file stem>"); `lang` is the default for lines without one."""
    name = name or "jsonl:" + os.path.splitext(os.path.basename(path))[0]
    problems = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if not require_answer and "answer" not in rec:
                rec = {**rec, "answer": ""}
            for k in ("prompt", "answer"):
                if k not in rec:
                    raise ValueError(f"{where}: missing key {k!r}")
            if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
                raise ValueError(f"{where}: 'prompt' must be a non-empty string")
            if isinstance(rec["answer"], (dict, list)) or rec["answer"] is None:
                raise ValueError(f"{where}: 'answer' must be a string or a number")
            rl = rec.get("lang", lang)
            if rl not in LANGS:
                raise ValueError(f"{where}: lang must be one of {LANGS}, got {rl!r}")
            level = rec.get("level", 1)
            if not isinstance(level, int) or isinstance(level, bool) or level < 1:
                raise ValueError(f"{where}: level must be a positive integer, got {level!r}")
            meta = {"verifier": "math", "source": where}
            if rec.get("reasoning"):
                meta["reasoning"] = str(rec["reasoning"])
            columns = {k: v for k, v in rec.items() if k not in _KNOWN_KEYS}
            if columns:
                meta["columns"] = columns
            problems.append(Problem(name, level, rl, rec["prompt"], str(rec["answer"]), meta))
    if not problems:
        raise ValueError(f"{path}: no problems (empty file)")
    return JsonlTask(name, problems)


def split_problems(problems: list[Problem], fraction: float, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(train, held_out): round(fraction * n) problems (at least 1, at most n - 1) held out, chosen by a shuffle
    seeded with `seed`; both lists keep the file's order."""
    if not 0 < fraction < 1:
        raise ValueError(f"eval fraction must be in (0, 1), got {fraction!r}")
    n = len(problems)
    if n < 2:
        raise ValueError(f"cannot hold out a fraction of {n} problem(s): give a separate eval file")
    k = min(n - 1, max(1, round(fraction * n)))
    order = list(range(n))
    random.Random(f"holdout|{seed}").shuffle(order)
    held = set(order[:k])
    return [p for i, p in enumerate(problems) if i not in held], [p for i, p in enumerate(problems) if i in held]
