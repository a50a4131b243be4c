"""The Task protocol, the Problem record, and small helpers shared by every task.

A task turns (rng, level, lang) into a Problem: a short user prompt plus a canonical answer string and
the structured `meta` needed to verify or solve it (JSON-serialisable, so problems can be stored).
`verify(problem, answer_text)` judges the *final answer text only* (what follows "The answer is"),
never a whole completion: extracting that text is the reward code's job (nanoseek.train.rewards).
`solution(problem)` returns (reasoning, answer): a short, correct chain of thought in the problem's
language (it goes inside <think>...</think>) and the canonical answer.

Answer convention (shared with the corpus and the rewards): after </think> the assistant writes one
line, `The answer is X.` in English or `答案是 X。` in Chinese; see `answer_line`.
"""

from __future__ import annotations

import hashlib
import abc
import random
import re
from dataclasses import asdict, dataclass, field

LANGS = ("en", "zh")
LEVELS = (1, 2, 3, 4, 5)
TEST_BUCKETS = 8  # one problem identity in 8 belongs to the held-out "test" split
SPLITS = ("train", "test")
MAX_INT_DIGITS = 60  # answers longer than this are wrong for every embedded task: never int() them


@dataclass
class Problem:
    task: str
    level: int
    lang: str
    prompt: str  # the user message
    answer: str  # canonical answer string
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(task=d["task"], level=int(d["level"]), lang=d["lang"], prompt=d["prompt"],
                   answer=str(d["answer"]), meta=dict(d.get("meta") or {}))


class Task(abc.ABC):
    """Base class: subclasses set `name` and implement generate / verify / solution."""

    name: str = ""
    levels: tuple[int, ...] = LEVELS
    split_task: str | None = None  # derived tasks (verification) hash with their base task's name: same split

    @abc.abstractmethod
    def generate(self, rng: random.Random, level: int, lang: str) -> Problem:
        """A random problem at `level` in `lang`."""

    @abc.abstractmethod
    def verify(self, problem: Problem, answer_text: str) -> bool:
        """Whether an extracted answer solves the problem."""

    @abc.abstractmethod
    def solution(self, problem: Problem) -> tuple[str, str]:
        """(reasoning, answer): a correct worked solution in the problem's language."""

    def key(self, problem: Problem) -> str:
        """A language-free identity of the problem: the train/test split is a hash of it, so the
        English and Chinese renderings of one problem always land in the same split."""
        return str(problem.meta.get("key", problem.prompt))

    def check(self, level: int, lang: str) -> None:
        if level not in self.levels:
            raise ValueError(f"{self.name}: level must be one of {self.levels}, got {level!r}")
        if lang not in LANGS:
            raise ValueError(f"{self.name}: lang must be one of {LANGS}, got {lang!r}")


def answer_line(answer: str, lang: str) -> str:
    """The final-answer line written after </think> (the convention extract_answer understands)."""
    return f"答案是 {answer}。" if lang == "zh" else f"The answer is {answer}."


def split_of(task_name: str, key: str) -> str:
    """'test' for about 1/TEST_BUCKETS of problem identities, 'train' for the rest (stable hash)."""
    h = hashlib.sha1(f"{task_name}|{key}".encode()).digest()[0]
    return "test" if h % TEST_BUCKETS == 0 else "train"


def sample_problem(task: Task, rng: random.Random, level: int, lang: str, split: str = "train",
                   max_tries: int = 10_000) -> Problem:
    """Draw problems from `task` until one belongs to `split` (disjoint train/test by construction)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    task.check(level, lang)
    for _ in range(max_tries):
        p = task.generate(rng, level, lang)
        if split_of(task.split_task or task.name, task.key(p)) == split:
            return p
    raise ValueError(f"{task.name}: no {split!r} problem at level {level} after {max_tries} draws "
                     "(the problem space is too small for this split)")


_INT_RE = re.compile(r"[+-]?\d+")
_GROUPED_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+")


def parse_int(text: str, max_digits: int = MAX_INT_DIGITS) -> int | None:
    """A plain integer (optional sign, optional 1,234 grouping, a trailing '= x' taken as x), else
    None. The length is checked before int(), so a 10,000-digit string costs nothing."""
    if not isinstance(text, str):
        return None
    s = text.strip()
    if "=" in s:  # "47 + 35 = 82" -> "82"
        s = s.rsplit("=", 1)[1].strip()
    s = s.replace("\u2212", "-")
    if len(s) > max_digits + 30:
        return None
    if _GROUPED_RE.fullmatch(s):
        s = s.replace(",", "")
    if not _INT_RE.fullmatch(s) or len(s.lstrip("+-")) > max_digits:
        return None
    return int(s)


def number_list(text: str, max_items: int = 200, max_digits: int = 20) -> list[int] | None:
    """Integers in `text` in order ('3, -1，7' -> [3, -1, 7]); None if too many or too long."""
    if not isinstance(text, str) or len(text) > max_items * (max_digits + 3):
        return None
    out = []
    for tok in re.findall(r"-?\d+", text):
        if len(tok.lstrip("-")) > max_digits or len(out) >= max_items:
            return None
        out.append(int(tok))
    return out


def join_nums(nums) -> str:
    return ", ".join(str(x) for x in nums)
