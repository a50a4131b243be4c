"""Multi-digit addition, subtraction and multiplication with column-wise chains of thought.

Levels (operands, digits per operand, operations; every intermediate result stays >= 0):
  1: a + b, 1-2 digits               (the genuinely learnable one for a 1M-parameter model)
  2: a + b or a - b, 2-3 digits
  3: a +/- b, 2-3 digits, or 2-digit x 1-digit
  4: three operands +/-, 2-4 digits, or 2-digit x 2-digit
  5: four operands +/-, 3-4 digits, or 3-digit x 2-digit
Addition and subtraction are worked column by column (carry / borrow); multiplication by a 1-digit
number digit by digit, by a longer number through partial products that are then added.
"""

from __future__ import annotations

import random

from .base import Problem, Task, parse_int

# level -> (operand count for +/-, (min digits, max digits), multiplication digits or None)
_SPEC = {1: (2, (1, 2), None), 2: (2, (2, 3), None), 3: (2, (2, 3), (2, 1)),
         4: (3, (2, 4), (2, 2)), 5: (4, (3, 4), (3, 2))}
_PLACES = {"en": ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"],
           "zh": ["个位", "十位", "百位", "千位", "万位", "十万位"]}
_PROMPTS = {"en": ["What is {e}?", "Compute {e}."], "zh": ["计算 {e}。", "{e} 等于多少？"]}


def _num(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def _place(lang: str, i: int) -> str:
    names = _PLACES[lang]
    return names[i] if i < len(names) else (f"column {i + 1}" if lang == "en" else f"第 {i + 1} 位")


def _add_steps(a: int, b: int, lang: str) -> list[str]:
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        terms = [int(d[i]) for d in (da, db) if i < len(d)] + ([carry] if carry else [])
        s = sum(terms)
        if len(terms) == 1:  # a lone digit just comes down
            lines.append(f"{_place(lang, i)}：{s}" if lang == "zh" else f"{_place(lang, i)}: {s}")
            carry = 0
            continue
        expr = " + ".join(map(str, terms))
        if lang == "zh":
            tail = f"写 {s % 10} 进 {s // 10}" if s >= 10 else f"写 {s}"
            lines.append(f"{_place(lang, i)}：{expr} = {s}，{tail}")
        else:
            tail = f"write {s % 10}, carry {s // 10}" if s >= 10 else f"write {s}"
            lines.append(f"{_place(lang, i)}: {expr} = {s}, {tail}")
        carry = s // 10
    if carry:
        lines.append(f"最后写进位 {carry}" if lang == "zh" else f"then write the carry {carry}")
    return lines


def _sub_steps(a: int, b: int, lang: str) -> list[str]:  # requires a >= b
    """Each column states its plain difference first ("2 - 4"), then whether it borrows: the digits to compare are
    written before the decision, as in the addition lines, instead of a leading "1" chosen before either digit."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, borrow = [], 0
    for i in range(len(da)):
        top = int(da[i])
        sub = int(db[i]) if i < len(db) else 0
        if i >= len(db) and not borrow:
            if i < len(da) - 1 or top:  # a leading digit with nothing to subtract
                lines.append(f"{_place(lang, i)}：{top}" if lang == "zh" else f"{_place(lang, i)}: {top}")
            continue
        need = top - borrow < sub
        rest = (" - 1" if borrow else "") + (f" - {sub}" if i < len(db) else "")
        r = top + 10 * need - borrow - sub
        if not need:
            line = f"{top}{rest} = {r}"
        elif lang == "zh":
            line = f"{top}{rest}，借 1：1{top}{rest} = {r}"  # borrowing turns 3 into 13
        else:
            line = f"{top}{rest}, borrow 1: 1{top}{rest} = {r}"
        lines.append(f"{_place(lang, i)}：{line}" if lang == "zh" else f"{_place(lang, i)}: {line}")
        borrow = 1 if need else 0
    return lines


def _mul_steps(a: int, b: int, lang: str) -> list[str]:
    if b < 10:  # digit by digit
        lines, carry = [], 0
        da = str(a)[::-1]
        for i, d in enumerate(da):
            p = int(d) * b + carry
            expr = f"{d} * {b}" + (f" + {carry}" if carry else "")
            last = i == len(da) - 1
            if lang == "zh":
                tail = f"写 {p}" if last or p < 10 else f"写 {p % 10} 进 {p // 10}"
                lines.append(f"{_place(lang, i)}：{expr} = {p}，{tail}")
            else:
                tail = f"write {p}" if last or p < 10 else f"write {p % 10}, carry {p // 10}"
                lines.append(f"{_place(lang, i)}: {expr} = {p}, {tail}")
            carry = p // 10
        return lines
    parts = []
    lines = []
    for i, d in enumerate(str(b)[::-1]):
        m = int(d) * 10 ** i
        parts.append(a * m)
        lines.append(f"{a} * {m} = {a * m}")
    total = " + ".join(map(str, parts))
    lines.append(f"{total} = {a * b}")
    return lines


def _binary_steps(a: int, op: str, b: int, lang: str) -> list[str]:
    head = f"{a} {op} {b}"
    if op == "+":
        body = _add_steps(a, b, lang)
    elif op == "-":
        body = _sub_steps(a, b, lang)
    else:
        body = _mul_steps(a, b, lang)
    r = a + b if op == "+" else a - b if op == "-" else a * b
    intro = f"算 {head}：" if lang == "zh" else f"{head}:"
    outro = f"得 {head} = {r}" if lang == "zh" else f"so {head} = {r}"
    return [intro] + body + [outro]


class ArithmeticTask(Task):
    name = "arithmetic"

    def generate(self, rng: random.Random, level: int, lang: str) -> Problem:
        self.check(level, lang)
        n_ops, (lo, hi), mul = _SPEC[level]
        if mul and rng.random() < 1 / 3:
            nums, ops = [_num(rng, mul[0]), _num(rng, mul[1])], ["*"]
        else:
            nums = [_num(rng, rng.randint(lo, hi)) for _ in range(n_ops)]
            ops, cur = [], nums[0]
            for i, x in enumerate(nums[1:], 1):
                op = "+" if level == 1 else rng.choice("+-")
                if op == "-" and cur < x:
                    if i == 1:  # swap so the result stays non-negative
                        nums[0], nums[1] = nums[1], nums[0]
                        cur, x = nums[0], nums[1]
                    else:
                        op = "+"
                cur = cur + x if op == "+" else cur - x
                ops.append(op)
        expr = str(nums[0]) + "".join(f" {op} {x}" for op, x in zip(ops, nums[1:]))
        value = nums[0]
        for op, x in zip(ops, nums[1:]):
            value = value + x if op == "+" else value - x if op == "-" else value * x
        prompt = rng.choice(_PROMPTS[lang]).format(e=expr)
        return Problem(self.name, level, lang, prompt, str(value),
                       {"nums": nums, "ops": ops, "key": expr.replace(" ", "")})

    def verify(self, problem: Problem, answer_text: str) -> bool:
        got = parse_int(answer_text)
        return got is not None and got == int(problem.answer)

    def solution(self, problem: Problem) -> tuple[str, str]:
        nums, ops, lang = problem.meta["nums"], problem.meta["ops"], problem.lang
        lines, cur = [], nums[0]
        for op, x in zip(ops, nums[1:]):
            lines += _binary_steps(cur, op, x, lang)
            cur = cur + x if op == "+" else cur - x if op == "-" else cur * x
        assert str(cur) == problem.answer
        return "\n".join(lines), problem.answer
