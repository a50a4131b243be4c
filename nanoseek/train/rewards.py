"""Rule-based rewards for R1-style GRPO: accuracy, format, language consistency, overlong penalty.

Completion layout. With a thinking prompt (the chat template ends in `<think>`) the completion is
`reasoning</think>answer`; a single leading `<think>` is tolerated. Text from the first
`<｜end▁of▁sentence｜>` on is ignored. The reasoning is what precedes the FIRST `</think>`, the answer
region is everything after it. With a non-thinking prompt (template ends in `</think>`) the whole
completion is the answer region (thinking=False). A multi-turn tool transcript (nanoseek.train.agentic:
assistant turns separated by `<｜tool▁output▁begin｜>...<｜tool▁output▁end｜>` blocks) has as reasoning every
turn's reasoning and as answer region the final turn's; its format is the final turn's.

Answer convention (shared with nanoseek.tasks.answer_line and nanoseek.data.corpus): the answer
region holds one line `The answer is X.` (English) or `答案是 X。` (Chinese). `extract_answer` also
understands `<answer>X</answer>`, `\\boxed{X}`, `Answer: X`, `Final answer: X`, `答案为 X`,
`答案：X`. X runs to the end of the line, stopping at `<`, `。` or a sentence-ending period (a `.`
followed by a space or the end), so `The answer is 0.5.` gives `0.5`. When several candidates
appear the LAST one (by position) is the answer; an `\\boxed{}` after a phrase on the same line
replaces that phrase's candidate. Only the last 4,000 characters are scanned and a candidate is cut
at 300 characters, so a 10,000-digit "answer" or a huge completion costs linear time and never
reaches int().

Bare answers. When no "The answer is" sentence is asked for (raw prompts, or thinking off: the
`bare=True` of accuracy_reward, RewardConfig.answer_format="bare"), an explicit answer still wins when
there is one; else the answer region's first line (cleaned as above, so `5.` and `5 <eos>` give `5`,
and `2+3 = 5` gives `5` through parse_int) is verified, then, if that fails, the FIRST number in the
region. The first, not the last: a raw completion goes on writing after its answer (the next "Q: ..."),
so its first number is the answer, and a completion listing many numbers gets one try, not many.

All rewards are pure Python, return a float and never raise on model text. `combine_rewards` sums
weighted components (names: accuracy, format, language, length, plus any extra callables) and
returns both the total and the per-component values.

User rewards come in two signatures (`is_batched_reward` tells them apart):
- per sample: fn(prompt, completion, problem) -> float;
- TRL's batched one: fn(prompts, completions, **kwargs) -> list[float | None], called once per rollout with
  keyword arguments prompts (the problems' prompt texts), completions (decoded texts), completion_ids (token
  id lists), problems (nanoseek Problems), and every column of the data as a list: answer, task, level, lang
  and each extra JSONL column (None where a row lacks it). A function without **kwargs gets only the
  arguments it names. None (TRL: "not applicable") leaves that sample out of this reward: it adds 0 to the
  total and is left out of the logged mean.
`load_reward("module:function")` imports one (also "path/to/file.py:function").
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from nanoseek.tasks import Problem, math_equal, verify_answer

THINK, END_THINK = "<think>", "</think>"
EOS_MARKERS = ("<｜end▁of▁sentence｜>",)
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"  # tool transcripts
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
    closed its reasoning (no `</think>`: truncated or malformed). A tool transcript (tool outputs in it,
    nanoseek.train.agentic) has every turn's reasoning and the final turn's answer region."""
    text = _strip_eos(completion or "")
    if TOOL_OUTPUT_END in text:
        return _split_transcript(text, thinking)
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


def _split_transcript(text: str, thinking: bool) -> tuple[str, str | None]:
    """split_completion of a multi-turn tool transcript: the assistant turns are what lies between tool outputs
    (`<｜tool▁output▁begin｜>...<｜tool▁output▁end｜>`); their reasonings joined, and the last turn's answer region."""
    turns = [part.split(TOOL_OUTPUT_BEGIN, 1)[0] for part in text.split(TOOL_OUTPUT_END)]
    splits = [split_completion(turn, thinking) for turn in turns if turn.strip()] or [("", None)]
    return "\n".join(r for r, _ in splits if r.strip()), splits[-1][1]


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


_NUMBER_RE = re.compile(r"[+-]?\d+(?:\.\d+)?")


def bare_answers(text: str) -> list[str]:
    """Candidates of a bare final answer (no answer sentence), in the order they are tried: the first
    non-blank line cleaned, then the first number (see the module doc)."""
    text = (text or "")[:SCAN_CHARS].strip()
    if not text:
        return []
    out = [_clean(text)]
    m = _NUMBER_RE.search(text)
    if m:
        out.append(m.group(0))
    return list(dict.fromkeys(c for c in out if c))


def detect_lang(text: str) -> str:
    """'zh' if `text` contains a CJK ideograph, else 'en'."""
    return "zh" if _CJK_RE.search(text or "") else "en"


# ----------------------------------------------------------------------------- rewards
def accuracy_reward(completion: str, problem: Problem | dict | str, thinking: bool = True, bare: bool = False) -> float:
    """1.0 iff the last explicit answer AFTER `</think>` passes the problem's verifier.

    `problem` is a Problem (or its to_dict()), verified by its task; a plain string is a gold
    answer compared with math_equal (exact, integer, then math-verify). No `</think>` in a
    thinking completion, no explicit answer, or an answer only inside the reasoning: 0.0.
    bare: with no explicit answer, the bare answer (first line, then first number) is judged instead.
    """
    if problem is None:
        raise ValueError("accuracy_reward needs a Problem, its dict, or a gold answer string")
    _, region = split_completion(completion, thinking)
    answer = extract_answer(region) if region else None
    cands = [answer] if answer is not None else (bare_answers(region) if bare and region else [])
    if not cands:
        return 0.0
    if isinstance(problem, dict):
        problem = Problem.from_dict(problem)
    for cand in cands:
        try:
            ok = verify_answer(problem, cand) if isinstance(problem, Problem) else math_equal(str(problem), cand)
        except Exception:  # a verifier must never take a training run down on odd model text
            ok = False
        if ok:
            return 1.0
    return 0.0


def format_reward(completion: str, thinking: bool = True) -> float:
    """1.0 iff the completion is `reasoning</think>answer` with exactly one `</think>`, no other
    `<think>` (one leading `<think>` is tolerated), non-blank reasoning, and an answer region that
    holds exactly one explicit answer in the convention. With thinking=False: no think tags at all
    and exactly one explicit answer. Else 0.0. Of a tool transcript, the final turn is judged."""
    text = _strip_eos(completion or "")
    if TOOL_OUTPUT_END in text:  # a tool transcript: the final turn (after the last tool output) is judged
        text = text.rsplit(TOOL_OUTPUT_END, 1)[1]
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


ExtraReward = Callable[..., Any]  # fn(prompt, completion, problem) -> float, or TRL's batched signature
BUILTIN_REWARDS = ("accuracy", "format", "language", "length")
_BATCHED_FIRST = ("prompts", "completions")


def is_batched_reward(fn) -> bool:
    """Whether `fn` takes TRL's batched signature fn(prompts, completions, **kwargs) -> list: an explicit
    `fn.batched` attribute decides; else a first parameter named prompts or completions, or a **kwargs
    parameter, means batched; anything else is the per-sample fn(prompt, completion, problem) -> float."""
    flag = getattr(fn, "batched", None)
    if flag is not None:
        return bool(flag)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    return bool(params) and params[0].name in _BATCHED_FIRST


def _call_batched(fn, kwargs: dict):
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return fn(**kwargs)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return fn(**{k: v for k, v in kwargs.items() if k in names})


def problem_columns(problems) -> dict[str, list]:
    """The data columns of aligned problems, as TRL passes dataset columns to a reward: answer, task, level, lang,
    and every extra JSONL column (Problem.meta["columns"]); None where a problem lacks one."""
    extra: dict[str, None] = {}
    for p in problems:
        if isinstance(p, Problem):
            extra.update(dict.fromkeys((p.meta.get("columns") or {})))
    cols = {k: [] for k in ("answer", "task", "level", "lang", *[k for k in extra if k not in
                                                                  ("answer", "task", "level", "lang")])}
    for p in problems:
        if isinstance(p, Problem):
            row = {"answer": p.answer, "task": p.task, "level": p.level, "lang": p.lang, **(p.meta.get("columns") or {})}
        elif isinstance(p, dict):
            row = p
        else:
            row = {"answer": p}
        for k in cols:
            cols[k].append(row.get(k))
    return cols


def load_reward(spec: str) -> tuple[str, Callable]:
    """(name, function) of "module:function" (an importable module, e.g. on PYTHONPATH) or
    "path/to/file.py:function"; the name is the function's."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"reward {spec!r}: expected module:function (or path/to/file.py:function)")
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"reward {spec!r}: expected module:function")
    try:
        if mod_name.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location(f"nanoseek_reward_{abs(hash(mod_name))}", mod_name)
            if spec_ is None or spec_.loader is None:
                raise ImportError(f"cannot load {mod_name}")
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            if "" not in sys.path and "." not in sys.path:  # the working folder, as `python -m` would have it
                sys.path.append("")
            module = importlib.import_module(mod_name)
    except (ImportError, OSError, SyntaxError) as e:
        raise ValueError(f"reward {spec!r}: cannot import {mod_name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {mod_name} has no function {fn_name!r}")
    return fn_name, fn


def parse_reward_specs(specs, weights=None) -> tuple[dict[str, float], dict[str, Callable]]:
    """CLI-style reward specs -> (weights, extra callables). Each spec is a built-in name or module:function,
    optionally `=weight`; `weights` (a list aligned with specs, TRL's reward_weights) gives the weights of specs
    without one; else 1.0. Two functions with one name get _2, _3 ... suffixes."""
    specs = list(specs or [])
    if weights is not None and len(weights) != len(specs):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(specs)} rewards")
    out_w, extra = {}, {}
    for i, spec in enumerate(specs):
        body, w = spec, None
        head, eq, tail = spec.rpartition("=")
        if eq:
            try:
                body, w = head, float(tail)
            except ValueError:
                raise ValueError(f"reward {spec!r}: the weight after '=' must be a number") from None
        if w is None:
            w = float(weights[i]) if weights is not None else 1.0
        if body in BUILTIN_REWARDS:
            name = body
        else:
            name, fn = load_reward(body)
            base, k = name, 2
            while name in extra or name in BUILTIN_REWARDS:
                name, k = f"{base}_{k}", k + 1
            extra[name] = fn
        out_w[name] = w
    return out_w, extra


PROMPT_FORMATS = ("chat", "raw")
ANSWER_FORMATS = ("auto", "sentence", "bare")


def resolve_answer_format(answer_format: str, prompt_format: str = "chat", thinking: bool = True) -> str:
    """"sentence" or "bare" for answer_format "auto": bare when the prompt asks for no answer sentence, that is
    with raw prompts or with thinking off; sentence (an explicit answer only) with the thinking chat template."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if answer_format != "auto":
        return answer_format
    return "bare" if prompt_format == "raw" or not thinking else "sentence"


@dataclass
class RewardConfig:
    """Weights per component (a weight of 0 still logs it) and the knobs of the built-ins."""
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    max_len: int = 1024  # length penalty: tokens (or characters when no token count is given)
    length_buffer: int = 256
    thinking: bool = True  # prompts open <think>; completions are reasoning</think>answer
    answer_format: str = "sentence"  # sentence: an explicit answer only; bare: also a bare one (module doc)

    def build(self, extra: dict[str, ExtraReward] | None = None) -> "CombinedReward":
        return combine_rewards(self.weights, extra, config=self)


class CombinedReward:
    """Callable (prompt, completion, problem, num_tokens=None) -> RewardResult(total, components); `batch` scores
    a whole rollout, calling TRL-style batched rewards once. A NaN component (a batched reward's None) adds 0."""

    def __init__(self, weights: dict[str, float], extra: dict[str, ExtraReward], config: RewardConfig):
        self.config = config
        self.extra = dict(extra)
        self.weights = {**{k: 1.0 for k in self.extra}, **weights}
        self.batched = {k for k, fn in self.extra.items() if is_batched_reward(fn)}

    def _builtin(self, name, prompt, completion, problem, num_tokens) -> float:
        cfg = self.config
        if name == "accuracy":
            if problem is None:
                raise ValueError("the accuracy reward needs a problem or a gold answer")
            return accuracy_reward(completion, problem, cfg.thinking, bare=cfg.answer_format == "bare")
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
            if name in self.batched:
                v = self._run_batched(name, [prompt], [completion], [problem], None)[0]
            elif name in self.extra:
                v = _checked(name, self.extra[name](prompt, completion, problem))
            else:
                v = self._builtin(name, prompt, completion, problem, num_tokens)
            comps[name] = v
        return RewardResult(self._total(comps), comps)

    def _total(self, comps: dict[str, float]) -> float:
        return sum(self.weights[k] * v for k, v in comps.items() if not math.isnan(v))

    def _run_batched(self, name, prompts, completions, problems, completion_ids, **kwargs) -> list[float]:
        cols = problem_columns(problems)
        kw = {**cols, **kwargs, "prompts": list(prompts), "completions": list(completions),
              "completion_ids": completion_ids if completion_ids is not None else [None] * len(completions),
              "problems": list(problems)}
        out = _call_batched(self.extra[name], kw)
        try:
            out = list(out)
        except TypeError:
            raise ValueError(f"reward {name!r} (batched: fn(prompts, completions, **kwargs)) returned "
                             f"{type(out).__name__}, not a list of floats") from None
        if len(out) != len(completions):
            raise ValueError(f"reward {name!r} returned {len(out)} rewards for {len(completions)} completions "
                             "(one per completion expected)")
        return [math.nan if v is None else _checked(name, v) for v in out]

    def batch(self, prompts, completions, problems, num_tokens=None, completion_ids=None,
              **kwargs) -> tuple[list[float], dict[str, list[float]]]:
        """Score aligned lists; returns (totals, {component: values}). Batched (TRL-style) rewards are called once,
        with completion_ids, the data columns and any extra keyword arguments (e.g. trainer_state)."""
        n = len(completions)
        num_tokens = num_tokens if num_tokens is not None else [None] * n
        if not len(prompts) == len(problems) == len(num_tokens) == n:
            raise ValueError("prompts, completions, problems and num_tokens must have the same length")
        comps: dict[str, list[float]] = {}
        for name in self.weights:
            if name in self.batched:
                comps[name] = self._run_batched(name, prompts, completions, problems, completion_ids, **kwargs)
            elif name in self.extra:
                comps[name] = [_checked(name, self.extra[name](p, c, q)) for p, c, q in zip(prompts, completions, problems)]
            else:
                comps[name] = [self._builtin(name, p, c, q, k)
                               for p, c, q, k in zip(prompts, completions, problems, num_tokens)]
        totals = [self._total({k: v[i] for k, v in comps.items()}) for i in range(n)]
        return totals, comps


def _checked(name: str, v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"reward {name!r} returned {v!r}, not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"reward {name!r} returned a non-finite value {v}")
    return v


def combine_rewards(weights: dict[str, float] | None = None, extra: dict[str, ExtraReward] | None = None,
                    config: RewardConfig | None = None) -> CombinedReward:
    """Weighted sum of the built-in rewards (accuracy, format, language, length) named in `weights`
    and any `extra` callables fn(prompt, completion, problem) -> float (weight 1.0 unless
    `weights` names it), or TRL-style batched callables fn(prompts, completions, **kwargs) -> list
    (see is_batched_reward). `weights` defaults to config.weights (accuracy 1.0, format 0.1)."""
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
