"""Multi-digit multiplication, the task a calculator makes solvable (agentic RL, issue 16).

Levels (digits of a x digits of b): 1: 2 x 1, 2: 2 x 2, 3: 3 x 2, 4: 3 x 3, 5: 4 x 3. A model of a few million
parameters cannot multiply 3-digit by 2-digit numbers in its head; with the `calculator` tool
(nanoseek.tools) it only has to copy the operands into a call and the tool's result into its answer.

The train/test split hashes the same identity as the arithmetic task's ("347*29", under the name
"arithmetic"), so a held-out multiplication problem is never an arithmetic training problem either.

Two kinds of demonstration: `solution` (the Task protocol) is the in-head chain of thought, partial products
as the arithmetic task writes them; `tool_messages` is the agentic one, a chat in which the assistant thinks,
calls the calculator, reads its output and thinks again, then writes `The answer is N.` (the answer line every
task uses, so the accuracy reward checks it). `tool_sft_records` gives SFT records of those chats.
"""

from __future__ import annotations

import json
import random

from .arithmetic import _PROMPTS, _binary_steps
from .base import Problem, Task, answer_line, parse_int, sample_problem

DIGITS = {1: (2, 1), 2: (2, 2), 3: (3, 2), 4: (3, 3), 5: (4, 3)}  # level -> (digits of a, digits of b)
_BEFORE = {"en": "I need {e}. I will use the calculator.", "zh": "需要计算 {e}，用计算器。"}
_AFTER = {"en": "The calculator gives {e} = {r}.", "zh": "计算器算出 {e} = {r}。"}


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(max(2, 10 ** (digits - 1)), 10 ** digits - 1)  # never x0 or x1


class MultiplicationTask(Task):
    name = "multiplication"
    split_task = "arithmetic"  # the same problem identity lands in the same split as arithmetic's a * b

    def generate(self, rng: random.Random, level: int, lang: str) -> Problem:
        self.check(level, lang)
        da, db = DIGITS[level]
        a, b = _operand(rng, da), _operand(rng, db)
        expr = f"{a} * {b}"
        prompt = rng.choice(_PROMPTS[lang]).format(e=expr)
        return Problem(self.name, level, lang, prompt, str(a * b), {"nums": [a, b], "key": f"{a}*{b}"})

    def verify(self, problem: Problem, answer_text: str) -> bool:
        got = parse_int(answer_text)
        return got is not None and got == int(problem.answer)

    def solution(self, problem: Problem) -> tuple[str, str]:
        a, b = problem.meta["nums"]
        return "\n".join(_binary_steps(a, "*", b, problem.lang)), problem.answer


def calculator_call(problem: Problem) -> dict:
    """The OpenAI tool call a demonstration makes: calculator(expression="a * b")."""
    a, b = problem.meta["nums"]
    return {"type": "function", "function": {"name": "calculator",
                                             "arguments": json.dumps({"expression": f"{a} * {b}"})}}


def tool_messages(problem: Problem) -> list[dict]:
    """The agentic demonstration of one problem: user, assistant (reasoning, then a calculator call), the tool's
    output, assistant (reasoning on the output, then the answer line)."""
    from ..tools import call_tool

    a, b = problem.meta["nums"]
    expr, lang = f"{a} * {b}", problem.lang
    call = calculator_call(problem)
    result = call_tool("calculator", call["function"]["arguments"])
    assert result == problem.answer, (result, problem)
    return [{"role": "user", "content": problem.prompt},
            {"role": "assistant", "content": "", "reasoning_content": _BEFORE[lang].format(e=expr),
             "tool_calls": [call]},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": answer_line(problem.answer, lang),
             "reasoning_content": _AFTER[lang].format(e=expr, r=result)}]


def tool_sft_records(n: int, seed: int = 0, levels=(3,), langs=("en",)) -> list[dict]:
    """`n` SFT records {"messages": tool_messages(p)} of training-split problems (deterministic given the
    arguments): `sft(SFTConfig(records=tool_sft_records(2000), ...))` teaches the calculator call."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    task, rng = MultiplicationTask(), random.Random(f"multiplication-tools|{seed}")
    return [{"messages": tool_messages(sample_problem(task, rng, rng.choice(list(levels)), rng.choice(list(langs))))}
            for _ in range(n)]
