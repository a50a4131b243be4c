"""Countdown (TinyZero-style): reach a target with the given numbers and + - * /.

Each given number may be used at most once (a number given twice may be used twice). Instances are
built from the expression first, so every one is solvable. The verifier never evals: it parses the
expression with `ast` and walks a whitelist (integer constants, + - * /, parentheses), computes with
fractions.Fraction (so (8 / 3) * 3 is exactly 8 and 7 / 2 is never 3), and rejects numbers that
were not given, numbers used too often, division by zero and anything else (names, calls,
attributes, powers, unary minus).

Levels (numbers shown, numbers the construction uses, value range, operations):
  1: 2, 2, 1-20, + -          2: 3, 3, 1-10, + - *        3: 3, 3, 1-20, + - * /
  4: 4, 3-4, 1-25, + - * /    5: 5, 3-5, 1-50, + - * /
"""

from __future__ import annotations

import ast
import random
from fractions import Fraction

from .base import Problem, Task, join_nums

_SPEC = {1: (2, (2, 2), 20, "+-"), 2: (3, (3, 3), 10, "+-*"), 3: (3, (3, 3), 20, "+-*/"),
         4: (4, (3, 4), 25, "+-*/"), 5: (5, (3, 5), 50, "+-*/")}
_MAX_TARGET = 1000
_MAX_EXPR_CHARS = 200
_MAX_CONST_DIGITS = 12
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_PROMPTS = {
    "en": ["Use the numbers {n} to make {t}. Each number at most once; use + - * /.",
           "Reach {t} with {n} using + - * / (each number at most once)."],
    "zh": ["用 {n} 凑出 {t}，每个数最多用一次，可以用 + - * /。",
           "目标 {t}，数字 {n}，每个数最多用一次，用 + - * / 写出算式。"],
}
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _combine(left, op, right):
    """(value, text, precedence) items -> their combination, parenthesised only where needed."""
    (lv, lt, lp), (rv, rt, rp) = left, right
    p = _PREC[op]
    if lp < p:
        lt = f"({lt})"
    if rp < p or (rp == p and op in "-/"):
        rt = f"({rt})"
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv if op == "*" else lv // rv
    return value, f"{lt} {op} {rt}", p


def _build(rng: random.Random, nums: list[int], ops: str):
    """Fold `nums` into one expression with positive integer intermediates; None if stuck."""
    items = [(x, str(x), 3) for x in nums]
    steps = []
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        a, b = items[i], items[j]
        choices = []
        for op in ops:
            if op == "-" and a[0] <= b[0]:
                continue
            if op == "/" and (b[0] <= 1 or a[0] % b[0]):
                continue
            if op == "*" and (a[0] == 1 or b[0] == 1):
                continue  # x * 1 teaches nothing
            choices.append(op)
        if not choices:
            return None
        op = rng.choice(choices)
        c = _combine(a, op, b)
        steps.append([a[0], op, b[0], c[0]])
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [c]
    return items[0], steps


class CountdownTask(Task):
    name = "countdown"

    def generate(self, rng: random.Random, level: int, lang: str) -> Problem:
        self.check(level, lang)
        n_shown, (u_lo, u_hi), hi, ops = _SPEC[level]
        for _ in range(1000):
            nums = [rng.randint(1, hi) for _ in range(n_shown)]
            used = rng.sample(nums, rng.randint(u_lo, u_hi))
            built = _build(rng, used, ops)
            if built is None:
                continue
            (target, expr, _), steps = built
            if not 1 <= target <= _MAX_TARGET or target in nums:  # a given number is no puzzle
                continue
            rng.shuffle(nums)
            prompt = rng.choice(_PROMPTS[lang]).format(n=join_nums(nums), t=target)
            key = f"{sorted(nums)}->{target}"
            return Problem(self.name, level, lang, prompt, expr,
                           {"numbers": nums, "target": target, "steps": steps, "key": key})
        raise RuntimeError("countdown: could not build an instance")  # not reached in practice

    def verify(self, problem: Problem, answer_text: str) -> bool:
        return check_expression(answer_text, problem.meta["numbers"], problem.meta["target"])

    def solution(self, problem: Problem) -> tuple[str, str]:
        m, lang = problem.meta, problem.lang
        head = (f"数字 {join_nums(m['numbers'])}，目标 {m['target']}。" if lang == "zh"
                else f"Numbers {join_nums(m['numbers'])}, target {m['target']}.")
        lines = [head] + [f"{a} {op} {b} = {r}" for a, op, b, r in m["steps"]]
        lines.append(f"所以 {problem.answer} = {m['target']}。" if lang == "zh"
                     else f"So {problem.answer} = {m['target']}.")
        return "\n".join(lines), problem.answer


def _eval(node, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left, used), _eval(node.right, used)
        op = _OPS[type(node.op)]
        if op == "/":
            if right == 0:
                raise ZeroDivisionError
            return left / right
        return left + right if op == "+" else left - right if op == "-" else left * right
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    raise ValueError(f"disallowed syntax: {type(node).__name__}")


def check_expression(text: str, numbers: list[int], target: int) -> bool:
    """True iff `text` is an arithmetic expression over a sub-multiset of `numbers` equal to `target`.

    A trailing "= value" is allowed when value equals the target ("3 * 5 + 2 = 17"); x and ÷ are
    read as * and /. Everything else outside the whitelist is rejected without being executed.
    """
    if not isinstance(text, str):
        return False
    s = text.strip().replace("×", "*").replace("÷", "/").replace("\u2212", "-")
    if not s or len(s) > _MAX_EXPR_CHARS:
        return False
    if "=" in s:
        s, _, rhs = s.partition("=")
        rhs = rhs.strip().rstrip(".。")
        if rhs != str(target):
            return False
    if any(c.isdigit() for c in s) and max(len(t) for t in _digit_runs(s)) > _MAX_CONST_DIGITS:
        return False
    try:
        tree = ast.parse(s.strip(), mode="eval")
        used: list[int] = []
        value = _eval(tree, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError, TypeError):
        return False
    pool = list(numbers)
    for x in used:
        if x not in pool:
            return False  # not given, or given fewer times than used
        pool.remove(x)
    return value == target


def _digit_runs(s: str) -> list[str]:
    runs, cur = [], ""
    for c in s:
        if c.isdigit():
            cur += c
        elif cur:
            runs.append(cur)
            cur = ""
    return runs + ([cur] if cur else [])
