"""Knights and Knaves: knights always tell the truth, knaves always lie; who is which?

People are named A, B, C in both languages (single letters count as neutral symbols for the
language-consistency reward). Each instance is filtered to have exactly one consistent assignment.
Statements (stored in meta as JSON lists, `role` true = knight):
  ["is", X, role]            X is a knight / knave
  ["both", X, Y, role]       X and Y are both knights / knaves
  ["atleast", X, Y, role]    at least one of X and Y is a knight / knave
  ["same", X, Y] / ["diff", X, Y]   X and Y are the same / different kinds
Levels: 1: 2 people, 1-2 speakers; 2: 2 people, both speak; 3: 3 people, simple statements plus
"both"/"atleast"; 4: 3 people, any statement; 5: 3 people, compound statements only.
The chain of thought tries assignments in order (knights first) and stops at the consistent one.
The canonical answer is "A: knight, B: knave" (zh "A：骑士，B：骗子"); the verifier accepts either
language and separators such as "A is a knight", "A=knave", "A 是骑士".
"""

from __future__ import annotations

import itertools
import random
import re

from .base import Problem, Task

_NAMES = "ABC"
_SPEC = {1: (2, (1, 2), ("is", "both", "atleast", "same", "diff")),
         2: (2, (2, 2), ("is", "both", "atleast", "same", "diff")),
         3: (3, (3, 3), ("is", "both", "atleast")),
         4: (3, (3, 3), ("is", "both", "atleast", "same", "diff")),
         5: (3, (3, 3), ("both", "atleast", "same", "diff"))}
_ROLE = {"en": {True: "knight", False: "knave"}, "zh": {True: "骑士", False: "骗子"}}
_PAIR_RE = re.compile(r"([A-C])\s*(?:(?i:is\s+an?|is)|=|:|：|是)?\s*((?i:knight|knave)|骑士|骗子)")


def holds(stmt: list, world: dict[str, bool]) -> bool:
    kind = stmt[0]
    if kind == "is":
        return world[stmt[1]] == stmt[2]
    if kind == "both":
        return world[stmt[1]] == stmt[3] and world[stmt[2]] == stmt[3]
    if kind == "atleast":
        return world[stmt[1]] == stmt[3] or world[stmt[2]] == stmt[3]
    if kind == "same":
        return world[stmt[1]] == world[stmt[2]]
    return world[stmt[1]] != world[stmt[2]]  # "diff"


def consistent(world: dict[str, bool], says: list) -> str | None:
    """None if every speaker's statement is true exactly when the speaker is a knight, else the
    first speaker who breaks that."""
    for speaker, stmt in says:
        if holds(stmt, world) != world[speaker]:
            return speaker
    return None


def render(stmt: list, lang: str) -> str:
    kind, r = stmt[0], _ROLE[lang]
    if lang == "zh":
        if kind == "is":
            return f"{stmt[1]} 是{r[stmt[2]]}"
        if kind == "both":
            return f"{stmt[1]} 和 {stmt[2]} 都是{r[stmt[3]]}"
        if kind == "atleast":
            return f"{stmt[1]} 和 {stmt[2]} 至少有一个是{r[stmt[3]]}"
        return f"{stmt[1]} 和 {stmt[2]} {'是' if kind == 'same' else '不是'}同一类人"
    if kind == "is":
        return f"{stmt[1]} is a {r[stmt[2]]}"
    if kind == "both":
        return f"{stmt[1]} and {stmt[2]} are both {r[stmt[3]]}s"
    if kind == "atleast":
        return f"at least one of {stmt[1]} and {stmt[2]} is a {r[stmt[3]]}"
    return f"{stmt[1]} and {stmt[2]} are {'the same kind' if kind == 'same' else 'different kinds'}"


def _statement(rng: random.Random, speaker: str, people: str, kinds) -> list:
    kind = rng.choice(kinds)
    if kind == "is":
        return ["is", rng.choice([p for p in people if p != speaker]), rng.random() < 0.5]
    x, y = sorted(rng.sample(people, 2))
    return [kind, x, y] + ([rng.random() < 0.5] if kind in ("both", "atleast") else [])


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _worlds(people: str):
    for roles in itertools.product((True, False), repeat=len(people)):
        yield dict(zip(people, roles))


def _answer(world: dict[str, bool], lang: str) -> str:
    r = _ROLE[lang]
    sep, colon = ("，", "：") if lang == "zh" else (", ", ": ")
    return sep.join(f"{p}{colon}{r[world[p]]}" for p in sorted(world))


class KnightsTask(Task):
    name = "knights"

    def generate(self, rng: random.Random, level: int, lang: str) -> Problem:
        self.check(level, lang)
        n, (s_lo, s_hi), kinds = _SPEC[level]
        people = _NAMES[:n]
        for _ in range(10_000):
            speakers = sorted(rng.sample(people, rng.randint(s_lo, s_hi)))
            says = [[s, _statement(rng, s, people, kinds)] for s in speakers]
            sols = [w for w in _worlds(people) if consistent(w, says) is None]
            if len(sols) == 1:
                break
        else:
            raise RuntimeError("knights: no uniquely solvable instance found")  # not reached
        world = sols[0]
        if lang == "zh":
            body = "".join(f"{s} 说：“{render(st, lang)}。”" for s, st in says)
            prompt = f"骑士总说真话，骗子总说假话。{body}谁是骑士，谁是骗子？"
        else:
            body = " ".join(f'{s} says: "{_cap(render(st, lang))}."' for s, st in says)
            prompt = f"Knights always tell the truth and knaves always lie. {body} Who is a knight and who is a knave?"
        key = repr((people, says))
        return Problem(self.name, level, lang, prompt, _answer(world, lang),
                       {"people": people, "says": says, "solution": world, "key": key})

    def verify(self, problem: Problem, answer_text: str) -> bool:
        if not isinstance(answer_text, str) or len(answer_text) > 500:
            return False
        got: dict[str, bool] = {}
        for name, role in _PAIR_RE.findall(answer_text):
            knight = role.lower() == "knight" or role == "骑士"
            if got.setdefault(name, knight) != knight:
                return False  # contradictory claims about one person
        return got == problem.meta["solution"]

    def solution(self, problem: Problem) -> tuple[str, str]:
        lang, says, people = problem.lang, problem.meta["says"], problem.meta["people"]
        r = _ROLE[lang]
        lines = []
        for world in _worlds(people):
            case = ("，" if lang == "zh" else ", ").join(f"{p}={r[world[p]]}" for p in people)
            bad = consistent(world, says)
            if bad is None:
                lines.append(f"{case}：每个人的话都对得上，成立。" if lang == "zh"
                             else f"{case}: every claim fits. Yes.")
                break
            said = dict((s, st) for s, st in says)[bad]
            truth = holds(said, world)
            if lang == "zh":
                lines.append(f"{case}：{bad} 的话是{'真' if truth else '假'}的，"
                             f"{bad} 不能是{r[world[bad]]}，不行。")
            else:
                lines.append(f"{case}: {bad}'s claim is {'true' if truth else 'false'}, "
                             f"so {bad} can't be a {r[world[bad]]}. No.")
        answer = _answer(world, lang)
        assert world == problem.meta["solution"]
        lines.append(f"所以 {answer}。" if lang == "zh" else f"So {answer}.")
        return "\n".join(lines), answer
