"""Sort a short list of integers ascending or descending; the answer is the comma-separated list.

Levels (count, value range): 1: 3 in 0-9, 2: 4 in 0-99, 3: 5 in 0-99, 4: 6 in 0-999,
5: 8 in -99..999. The chain of thought is selection sort: pick the smallest (largest) of what is
left, one line per pick.
"""

from __future__ import annotations

import random

from .base import Problem, Task, join_nums, number_list

_SPEC = {1: (3, 0, 9), 2: (4, 0, 99), 3: (5, 0, 99), 4: (6, 0, 999), 5: (8, -99, 999)}
_PROMPTS = {
    ("en", "asc"): ["Sort in ascending order: {n}", "Sort from smallest to largest: {n}"],
    ("en", "desc"): ["Sort in descending order: {n}", "Sort from largest to smallest: {n}"],
    ("zh", "asc"): ["从小到大排序：{n}", "把这些数按从小到大排列：{n}"],
    ("zh", "desc"): ["从大到小排序：{n}", "把这些数按从大到小排列：{n}"],
}


class SortingTask(Task):
    name = "sorting"

    def generate(self, rng: random.Random, level: int, lang: str) -> Problem:
        self.check(level, lang)
        count, lo, hi = _SPEC[level]
        nums = [rng.randint(lo, hi) for _ in range(count)]
        order = rng.choice(("asc", "desc"))
        answer = join_nums(sorted(nums, reverse=order == "desc"))
        prompt = rng.choice(_PROMPTS[(lang, order)]).format(n=join_nums(nums))
        return Problem(self.name, level, lang, prompt, answer,
                       {"numbers": nums, "order": order, "key": f"{order}:{join_nums(nums)}"})

    def verify(self, problem: Problem, answer_text: str) -> bool:
        got = number_list(answer_text)
        want = sorted(problem.meta["numbers"], reverse=problem.meta["order"] == "desc")
        return got == want

    def solution(self, problem: Problem) -> tuple[str, str]:
        nums, desc, zh = list(problem.meta["numbers"]), problem.meta["order"] == "desc", problem.lang == "zh"
        if zh:
            word, lines = ("最大" if desc else "最小"), [f"数字：{join_nums(nums)}"]
        else:
            word, lines = ("largest" if desc else "smallest"), [f"Numbers: {join_nums(nums)}"]
        picked = []
        while len(nums) > 1:
            x = max(nums) if desc else min(nums)
            nums.remove(x)
            picked.append(x)
            lines.append(f"{word}是 {x}，剩下 {join_nums(nums)}" if zh
                         else f"{word} is {x}, left {join_nums(nums)}")
        picked.append(nums[0])
        lines.append(f"最后是 {nums[0]}" if zh else f"last is {nums[0]}")
        lines.append(f"排好：{join_nums(picked)}" if zh else f"sorted: {join_nums(picked)}")
        return "\n".join(lines), join_nums(picked)
