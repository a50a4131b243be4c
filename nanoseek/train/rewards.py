"""Rule-based rewards for R1-style GRPO: accuracy, format, language consistency, overlong penalty.

Completion layout. With a thinking prompt (the chat template ends in `<think>`) the completion is
`reasoning</think>answer`; a single leading `<think>` is tolerated. Text from the first
`<｜end▁of▁sentence｜>` on is ignored. The reasoning is what precedes the FIRST `</think>`, the answer
region is everything after it. With a non-thinking prompt (template ends in `</think>`) the whole
completion is the answer region (thinking=False).

Answer convention (shared with nanoseek.tasks.answer_line and nanoseek.data.corpus): the answer
region holds one line `The answer is X.` (English) or `答案是 X。` (Chinese). `extract_answer` also
understands `<answer>X</answer>`, `\\boxed{X}`, `Answer: X`, `Final answer: X`, `答案为 X`,
`答案：X`. X runs to the end of the line, stopping at `<`, `。` or a sentence-ending period (a `.`
followed by a space or the end), so `The answer is 0.5.` gives `0.5`. When several candidates
appear the LAST one (by position) is the answer; an `\\boxed{}` after a phrase on the same line
replaces that phrase's candidate. Only the last 4,000 characters are scanned and a candidate is cut
at 300 characters, so a 10,000-digit "answer" or a huge completion costs linear time and never
reaches int().

All rewards are pure Python, return a float and never raise on model text. `combine_rewards` sums
weighted components (names: accuracy, format, language, length, plus any extra callables) and
returns both the total and the per-component values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from nanoseek.tasks import Problem, math_equal, verify_answer

THINK, END_THINK = "<think>", "</think>"
EOS_MARKERS = ("<｜end▁of▁sentence｜>",)
MAX_ANSWER_CHARS = 300
SCAN_CHARS = 4000

_PHRASE_RE = re.compile(r"(?i:\b(?:the\s+)?(?:final\s+)?answer\s+is\b\s*[:：]?|\b(?:final\s+)?answer\s*[:：])"
                        r"|答案\s*(?:是|为|：|:)\s*[:：]?")
_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
_BOXED = "\\boxed{"
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD_RE = re.compile(r"[A-Za-z]+")


# ----------------------------------------------------------------------------- parsing
def _strip_eos(text: str) -> str:
    for m in EOS_MARKERS:
        i = text.find(m)
        if i >= 0:
            text = text[:i]
    return text


def split_completion(completion: str, thinking: bool = True) -> tuple[str, str | None]:
    """(reasoning, answer region). The answer region is None when a thinking completion never
    closed its reasoning (no `</think>`: truncated or malformed)."""
    text = _strip_eos(completion or "")
    if END_THINK in text:
        reasoning, answer = text.split(END_THINK, 1)
    elif thinking:
        reasoning, answer = text, None
    else:
        reasoning, answer = "", text
    reasoning = reasoning.lstrip()
    if reasoning.startswith(THINK):
        reasoning = reasoning[len(THINK):]
    return reasoning, answer


def _clean(rest: str) -> str:
    rest = rest[:MAX_ANSWER_CHARS].split("\n", 1)[0].split("<", 1)[0].split("。", 1)[0]
    m = _SENTENCE_END.search(rest)
    if m:
        rest = rest[:m.start()]
    return rest.strip().strip("*$ ").rstrip(".,，;；:：").strip()


def _braced(text: str, start: int) -> str | None:
    depth = 1
    for i in range(start, min(len(text), start + MAX_ANSWER_CHARS)):
        c = text[i]
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return text[start:i]
    return None


def find_answers(text: str) -> list[str]:
    """Every explicit final-answer candidate in `text`, in order of position (see module doc)."""
    if not text:
        return []
    text = text[-SCAN_CHARS:]
    cands: list[tuple[int, str]] = []
    tag_spans = []
    for m in _TAG_RE.finditer(text):
        inner = find_answers(m.group(1)[:SCAN_CHARS]) if "<answer>" not in m.group(1) else []
        cands.append((m.start(), inner[-1] if inner else _clean(m.group(1).strip())))
        tag_spans.append(m.span())

    def outside(i: int) -> bool:
        return not any(a <= i < b for a, b in tag_spans)

    i = text.find(_BOXED)
    while i >= 0:
        v = _braced(text, i + len(_BOXED))
        if v is not None and outside(i):
            cands.append((i, v.strip()))
        i = text.find(_BOXED, i + 1)
    for m in _PHRASE_RE.finditer(text):
        rest = text[m.end():m.end() + MAX_ANSWER_CHARS]
        if outside(m.start()) and _BOXED not in rest.split("\n", 1)[0]:
            cands.append((m.start(), _clean(rest)))
    cands.sort(key=lambda c: c[0])
    return [v for _, v in cands if v]


def extract_answer(text: str) -> str | None:
    """The last explicit answer in `text` (normally the answer region), or None."""
    found = find_answers(text or "")
    return found[-1] if found else None


def detect_lang(text: str) -> str:
    """'zh' if `text` contains a CJK ideograph, else 'en'."""
    return "zh" if _CJK_RE.search(text or "") else "en"


# ----------------------------------------------------------------------------- rewards
def accuracy_reward(completion: str, problem: Problem | dict | str, thinking: bool = True) -> float:
    """1.0 iff the last explicit answer AFTER `</think>` passes the problem's verifier.

    `problem` is a Problem (or its to_dict()), verified by its task; a plain string is a gold
    answer compared with math_equal (exact, integer, then math-verify). No `</think>` in a
    thinking completion, no explicit answer, or an answer only inside the reasoning: 0.0.
    """
    if problem is None:
        raise ValueError("accuracy_reward needs a Problem, its dict, or a gold answer string")
    _, region = split_completion(completion, thinking)
    answer = extract_answer(region) if region else None
    if answer is None:
        return 0.0
    if isinstance(problem, dict):
        problem = Problem.from_dict(problem)
    try:
        ok = verify_answer(problem, answer) if isinstance(problem, Problem) else math_equal(str(problem), answer)
    except Exception:  # a verifier must never take a training run down on odd model text
        ok = False
    return 1.0 if ok else 0.0


def format_reward(completion: str, thinking: bool = True) -> float:
    """1.0 iff the completion is `reasoning</think>answer` with exactly one `</think>`, no other
    `<think>` (one leading `<think>` is tolerated), non-blank reasoning, and an answer region that
    holds exactly one explicit answer in the convention. With thinking=False: no think tags at all
    and exactly one explicit answer. Else 0.0."""
    text = _strip_eos(completion or "")
    if thinking:
        body = text.lstrip()
        if body.startswith(THINK):
            body = body[len(THINK):]
        if THINK in body or body.count(END_THINK) != 1:
            return 0.0
        reasoning, answer = body.split(END_THINK)
        if not reasoning.strip():
            return 0.0
    else:
        if THINK in text or END_THINK in text:
            return 0.0
        answer = text
    return 1.0 if len(find_answers(answer)) == 1 else 0.0


def language_consistency(text: str, lang: str) -> float:
    """Share of language-bearing units of `text` that are in `lang`.

    Units: each CJK ideograph (U+3400-4DBF, U+4E00-9FFF, U+F900-FAFF) is one Chinese unit; each
    maximal run of 2+ ASCII letters is one English word (single letters such as A, B, x are
    variable names: neutral). Digits, punctuation, math symbols, whitespace and everything else are
    neutral. Result = target units / (Chinese units + English words), in [0, 1]. Text with no
    units: 1.0 if it has any non-blank character (a purely symbolic chain is consistent), 0.0 if
    blank.
    """
    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    text = text or ""
    zh = len(_CJK_RE.findall(text))
    en = sum(1 for w in _LATIN_WORD_RE.findall(text) if len(w) >= 2)
    if zh + en == 0:
        return 1.0 if text.strip() else 0.0
    return (zh if lang == "zh" else en) / (zh + en)


def language_consistency_reward(completion: str, lang: str, thinking: bool = True) -> float:
    """language_consistency of the chain of thought (the text before `</think>`, without think
    tags); with thinking=False, of the whole completion."""
    reasoning, region = split_completion(completion, thinking)
    text = reasoning if thinking else (region or "")
    return language_consistency(text.replace(THINK, " ").replace(END_THINK, " "), lang)


def length_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO soft overlong punishment: 0 up to max_len - buffer, then linear down to -1 at max_len,
    -1 beyond. buffer=0 is a hard cliff (0 up to max_len, -1 above)."""
    if max_len <= 0 or not 0 <= buffer <= max_len:
        raise ValueError(f"need max_len > 0 and 0 <= buffer <= max_len, got max_len={max_len}, buffer={buffer}")
    start = max_len - buffer
    if length <= start:
        return 0.0
    if length >= max_len:
        return -1.0
    return (start - length) / buffer


# ----------------------------------------------------------------------------- combining
class RewardResult(NamedTuple):
    total: float
    components: dict[str, float]


ExtraReward = Callable[[str, str, Any], float]  # fn(prompt, completion, problem) -> float
BUILTIN_REWARDS = ("accuracy", "format", "language", "length")


@dataclass
class RewardConfig:
    """Weights per component (a weight of 0 still logs it) and the knobs of the built-ins."""
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    max_len: int = 1024  # length penalty: tokens (or characters when no token count is given)
    length_buffer: int = 256
    thinking: bool = True  # prompts open <think>; completions are reasoning</think>answer

    def build(self, extra: dict[str, ExtraReward] | None = None) -> "CombinedReward":
        return combine_rewards(self.weights, extra, config=self)


class CombinedReward:
    """Callable (prompt, completion, problem, num_tokens=None) -> RewardResult(total, components)."""

    def __init__(self, weights: dict[str, float], extra: dict[str, ExtraReward], config: RewardConfig):
        self.config = config
        self.extra = dict(extra)
        self.weights = {**{k: 1.0 for k in self.extra}, **weights}

    def _builtin(self, name, prompt, completion, problem, num_tokens) -> float:
        cfg = self.config
        if name == "accuracy":
            if problem is None:
                raise ValueError("the accuracy reward needs a problem or a gold answer")
            return accuracy_reward(completion, problem, cfg.thinking)
        if name == "format":
            return format_reward(completion, cfg.thinking)
        if name == "language":
            lang = problem.lang if isinstance(problem, Problem) else (
                problem.get("lang") if isinstance(problem, dict) else None) or detect_lang(prompt)
            return language_consistency_reward(completion, lang, cfg.thinking)
        n = num_tokens if num_tokens is not None else len(completion or "")
        return length_penalty(n, cfg.max_len, cfg.length_buffer)

    def __call__(self, prompt: str, completion: str, problem: Any = None,
                 num_tokens: int | None = None) -> RewardResult:
        comps = {}
        for name in self.weights:
            if name in self.extra:
                v = float(self.extra[name](prompt, completion, problem))
                if not math.isfinite(v):
                    raise ValueError(f"reward {name!r} returned a non-finite value {v}")
            else:
                v = self._builtin(name, prompt, completion, problem, num_tokens)
            comps[name] = v
        total = sum(self.weights[k] * v for k, v in comps.items())
        return RewardResult(total, comps)

    def batch(self, prompts, completions, problems, num_tokens=None) -> tuple[list[float], dict[str, list[float]]]:
        """Score aligned lists; returns (totals, {component: values})."""
        num_tokens = num_tokens if num_tokens is not None else [None] * len(completions)
        results = [self(p, c, q, n) for p, c, q, n in zip(prompts, completions, problems, num_tokens, strict=True)]
        return [r.total for r in results], {k: [r.components[k] for r in results] for k in self.weights}


def combine_rewards(weights: dict[str, float] | None = None, extra: dict[str, ExtraReward] | None = None,
                    config: RewardConfig | None = None) -> CombinedReward:
    """Weighted sum of the built-in rewards (accuracy, format, language, length) named in `weights`
    and any `extra` callables fn(prompt, completion, problem) -> float (weight 1.0 unless
    `weights` names it). `weights` defaults to config.weights (accuracy 1.0, format 0.1)."""
    config = config or RewardConfig()
    weights = dict(config.weights if weights is None else weights)
    extra = dict(extra or {})
    for name, fn in extra.items():
        if name in BUILTIN_REWARDS:
            raise ValueError(f"extra reward {name!r} clashes with a built-in reward name")
        if not callable(fn):
            raise ValueError(f"extra reward {name!r} is not callable")
    for name, w in weights.items():
        if name not in BUILTIN_REWARDS and name not in extra:
            raise ValueError(f"unknown reward {name!r}; built-ins: {', '.join(BUILTIN_REWARDS)}; "
                             f"extra: {', '.join(extra) or 'none'}")
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weight of {name!r} must be a finite number, got {w!r}")
    return CombinedReward(weights, extra, config)
