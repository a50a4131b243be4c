"""DeepSeekMath-V2 self-verification: rewards for training a verifier / meta-verifier / self-evaluating
generator, and the generate -> verify -> refine loop at inference (`nanoseek self-refine`).

Rewards (POSTTRAINING.md):
  verifier        format x (1 - |s' - s|), s' the predicted rubric score, s the gold one;
  generator       format x (0.76 * verifier score of the solution + 0.24 * (1 - |self score - verifier score|)),
                  where the generator ends its answer with a self-evaluation score.
The verification tasks (`verify_<task>`, `metaverify_<task>`, nanoseek.tasks.verification) plug these into
SFT, GRPO and eval like any other task; `verification_reward` is the graded reward for GRPO's `extra`.

`ModelJudge` turns any model into a rubric-scored reward (V3.2's reward model for general tasks).

The loop (`self_refine`): each problem gets a solution; then, for up to `rounds` rounds, `n_verify`
verifications score it (optionally screened by a meta-verifier: verifications it scores below 0.5 are
dropped, unless that drops them all); a solution whose mean score is 1 is final, otherwise the model
refines it with the harshest kept verification as the review. The answer is the best-scored solution
(the latest on ties). Everything is batched across problems through one Engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..tasks import Problem, get_task
from ..tasks.verification import META_PROMPT, REFINE_PROMPT, VERIFY_PROMPT, parse_score
from .rewards import extract_answer, format_reward, split_completion

GENERATOR_WEIGHTS = (0.76, 0.24)  # DeepSeekMath-V2: solution score, self-evaluation accuracy


def predicted_score(completion: str, thinking: bool = True) -> float | None:
    """The rubric score a verifier's completion gives (its final answer), or None."""
    _, region = split_completion(completion, thinking)
    return parse_score(extract_answer(region)) if region is not None else None


def verification_reward(prompt: str, completion: str, problem, thinking: bool = True) -> float:
    """format x (1 - |s' - s|) for a verify_* / metaverify_* problem (gold score in problem.answer); 0 when no
    score can be read. Usable as an `extra` reward: fn(prompt, completion, problem)."""
    s = predicted_score(completion, thinking)
    if s is None:
        return 0.0
    gold = float(problem.answer if isinstance(problem, Problem) else problem["answer"])
    return format_reward(completion, thinking) * (1.0 - abs(s - gold))


def generator_reward(completion: str, verifier_score: float, thinking: bool = True) -> float:
    """format x (0.76 * verifier_score + 0.24 * (1 - |self score - verifier_score|)); the self score is the
    last `Self-score: X` / `自评：X` / boxed score in the answer region (0 accuracy credit when absent)."""
    _, region = split_completion(completion, thinking)
    self_score = _self_score(region or "")
    acc = 0.0 if self_score is None else 1.0 - abs(self_score - verifier_score)
    a, b = GENERATOR_WEIGHTS
    return format_reward(completion, thinking) * (a * verifier_score + b * acc)


def _self_score(region: str) -> float | None:
    import re

    m = list(re.finditer(r"(?i:self[- ]score\s*[:：]?\s*|自评\s*[:：]?\s*)(\\boxed\{[^}]*\}|[\d./]+)", region))
    return parse_score(m[-1].group(1)) if m else None


# ----------------------------------------------------------------------------- a model as the reward
JUDGE_PROMPT = {
    "en": ("Rubric:\n{rubric}\n\nRequest:\n{prompt}\n\nResponse:\n{response}\n\n"
           "Score the response against the rubric: 1 if it meets it, 0.5 if it partly does, 0 if it does not. "
           "Give the score as the final answer."),
    "zh": ("评分标准：\n{rubric}\n\n请求：\n{prompt}\n\n回答：\n{response}\n\n"
           "按评分标准给回答打分：完全符合给 1 分，部分符合给 0.5 分，不符合给 0 分。把分数作为最终答案。"),
}


class ModelJudge:
    """A generative reward model: a nanoseek model scores a response against a rubric (0 / 0.5 / 1), the mean
    of `n` sampled judgements (unreadable ones count 0). V3.2 uses rubric-scored reward models for general,
    non-verifiable prompts; R1's second RL stage uses model-based rewards for open ones.

    Callable as an extra GRPO reward, fn(prompt, completion, problem) -> float; `score_batch` judges many
    responses in one batched generation. The rubric is fixed, or per problem (problem.meta["rubric"], or a
    dict problem's "rubric") when `rubric` is None."""

    def __init__(self, engine, rubric: str | None = None, n: int = 2, max_tokens: int = 128, temperature: float = 0.6,
                 thinking: bool = True, lang: str = "en", seed: int = 0):
        if engine.tokenizer is None:
            raise ValueError("ModelJudge needs an Engine with a tokenizer")
        if n < 1:
            raise ValueError(f"ModelJudge: n must be >= 1, got {n}")
        self.engine, self.rubric, self.n, self.max_tokens = engine, rubric, n, max_tokens
        self.temperature, self.thinking, self.lang, self.seed = temperature, thinking, lang, seed
        self.calls = 0

    def _rubric(self, problem) -> str:
        r = self.rubric
        if r is None and isinstance(problem, Problem):
            r = problem.meta.get("rubric")
        elif r is None and isinstance(problem, dict):
            r = problem.get("rubric")
        if not r:
            raise ValueError("ModelJudge: no rubric (give one, or problems carrying a 'rubric')")
        return r

    def score_batch(self, prompts: list[str], completions: list[str], problems: list | None = None) -> list[float]:
        from ..engine import SamplingParams

        problems = problems if problems is not None else [None] * len(prompts)
        tok = self.engine.tokenizer
        asks = [JUDGE_PROMPT[self.lang].format(rubric=self._rubric(q), prompt=p, response=_visible(c, self.thinking))
                for p, c, q in zip(prompts, completions, problems, strict=True)]
        ids = [tok.apply_chat_template([{"role": "user", "content": a}], thinking=self.thinking) for a in asks]
        params = SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, n=self.n,
                                seed=self.seed + self.calls)
        self.calls += 1
        outs = self.engine.generate(ids, params) if ids else []
        return [sum(predicted_score(o.text, self.thinking) or 0.0 for o in out.outputs) / self.n for out in outs]

    def __call__(self, prompt: str, completion: str, problem=None) -> float:
        return self.score_batch([prompt], [completion], [problem])[0]


# ----------------------------------------------------------------------------- the inference loop
@dataclass
class Round:
    solution: str  # the solution's completion text (reasoning</think>answer with the thinking template)
    answer: str | None  # its extracted final answer
    verifications: list[str]  # verifier completions
    scores: list[float | None]  # each verification's score (None: unreadable)
    meta_scores: list[float | None] | None  # the meta-verifier's score of each verification, when used
    score: float  # mean of the kept, readable scores (0 if none)
    correct: bool | None = None  # rule check of `answer`, when the problem has a task verifier


@dataclass
class RefineResult:
    problem: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def best(self) -> int:
        """Index of the best-scored round (the latest among equals)."""
        return max(range(len(self.rounds)), key=lambda i: (self.rounds[i].score, i))

    @property
    def answer(self) -> str | None:
        return self.rounds[self.best].answer


def _visible(completion: str, thinking: bool) -> str:
    """A solution as a verifier reads it: reasoning and answer, without the think tags."""
    reasoning, region = split_completion(completion, thinking)
    return "\n".join(x.strip() for x in (reasoning, region or "") if x and x.strip())


def self_refine(engine, problems: list[Problem | str], rounds: int = 4, n_verify: int = 2, meta_verify: bool = False,
                max_tokens: int = 256, temperature: float = 0.6, thinking: bool = True, lang: str = "en",
                seed: int = 0, progress=None) -> list[RefineResult]:
    """Generate, verify and refine each problem for up to `rounds` refinements (see the module docstring).
    problems: Problems (their task's rule verifier fills Round.correct) or plain prompt strings (in `lang`).
    progress: a nanoseek.train.common.Progress (start / update per round / close), or None."""
    from ..engine import SamplingParams

    if rounds < 0 or n_verify < 1:
        raise ValueError(f"need rounds >= 0 and n_verify >= 1, got rounds={rounds}, n_verify={n_verify}")
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("self_refine needs an Engine with a tokenizer")
    probs = [p if isinstance(p, Problem) else Problem("", 0, lang, p, "") for p in problems]

    def ask(prompts: list[str], n: int, salt: int) -> list[list[str]]:
        ids = [tok.apply_chat_template([{"role": "user", "content": q}], thinking=thinking) for q in prompts]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, n=n, seed=seed + salt)
        return [[c.text for c in o.outputs] for o in engine.generate(ids, params)] if ids else []

    results = [RefineResult(p.prompt) for p in probs]
    if progress is not None:
        progress.start(rounds + 1, "self-refine rounds")
    solutions = [s[0] for s in ask([p.prompt for p in probs], 1, 0)]
    active = list(range(len(probs)))
    for r in range(rounds + 1):
        vis = {i: _visible(solutions[i], thinking) for i in active}
        vprompts = [VERIFY_PROMPT[probs[i].lang].format(problem=probs[i].prompt, solution=vis[i]) for i in active]
        verifs = ask(vprompts, n_verify, 1000 * (r + 1))
        metas: list[list[float | None]] | None = None
        if meta_verify:
            mprompts = [META_PROMPT[probs[i].lang].format(problem=probs[i].prompt, solution=vis[i],
                                                          verification=_visible(v, thinking))
                        for i, vs in zip(active, verifs) for v in vs]
            flat = [predicted_score(m[0], thinking) for m in ask(mprompts, 1, 1000 * (r + 1) + 500)]
            metas = [flat[j * n_verify:(j + 1) * n_verify] for j in range(len(active))]
        still = []
        for j, i in enumerate(active):
            scores = [predicted_score(v, thinking) for v in verifs[j]]
            keep = list(range(n_verify))
            if metas is not None:
                trusted = [k for k in keep if (metas[j][k] or 0.0) >= 0.5]
                keep = trusted or keep
            readable = [scores[k] for k in keep if scores[k] is not None]
            score = sum(readable) / len(readable) if readable else 0.0
            answer = extract_answer(split_completion(solutions[i], thinking)[1] or "")
            correct = None
            if probs[i].task:
                correct = bool(answer is not None and get_task(probs[i].task).verify(probs[i], answer))
            results[i].rounds.append(Round(solutions[i], answer, verifs[j], scores,
                                           None if metas is None else metas[j], score, correct))
            if score < 1.0 and r < rounds:
                harsh = min(keep, key=lambda k: 2.0 if scores[k] is None else scores[k])
                still.append((i, _visible(verifs[j][harsh], thinking)))
        if progress is not None:
            progress.update(1, score=sum(results[i].rounds[-1].score for i in active) / len(active))
        if not still:
            break
        rprompts = [REFINE_PROMPT[probs[i].lang].format(problem=probs[i].prompt, solution=_visible(solutions[i], thinking),
                                                        verification=review) for i, review in still]
        for (i, _), new in zip(still, ask(rprompts, 1, 1000 * (r + 1) + 900)):
            solutions[i] = new[0]
        active = [i for i, _ in still]
    if progress is not None:
        progress.close()
    return results


def summarize(results: list[RefineResult]) -> dict:
    """Accuracy of the best-scored answer and of the latest answer after each round (problems that stopped
    early keep their last state), and how well the verifier's scores match the rule checks."""
    if not results:
        raise ValueError("no results to summarise")
    n_rounds = max(len(r.rounds) for r in results)
    best_acc, last_acc = [], []
    for k in range(n_rounds):
        b = l = 0
        for res in results:
            upto = res.rounds[: k + 1]
            bi = max(range(len(upto)), key=lambda i: (upto[i].score, i))
            b += bool(upto[bi].correct)
            l += bool(upto[-1].correct)
        best_acc.append(b / len(results))
        last_acc.append(l / len(results))
    pairs = [(rd.score, rd.correct) for res in results for rd in res.rounds if rd.correct is not None]
    agree = [float((s >= 0.5) == c) for s, c in pairs]
    return {"problems": len(results), "rounds_used": [len(r.rounds) for r in results],
            "accuracy_best_by_round": best_acc, "accuracy_latest_by_round": last_acc,
            "verifier_agreement": sum(agree) / len(agree) if agree else math.nan,
            "mean_score_by_round": [sum(r.rounds[min(k, len(r.rounds) - 1)].score for r in results) / len(results)
                                    for k in range(n_rounds)]}


# ----------------------------------------------------------------------------- the command
@dataclass
class SelfRefineConfig:
    model: str
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    levels: list[int] = field(default_factory=lambda: [2])
    langs: list[str] = field(default_factory=lambda: ["en"])
    num_problems: int = 32  # per task x level x language, from the held-out split
    rounds: int = 4
    n_verify: int = 2
    meta_verify: bool = False
    max_tokens: int = 256
    temperature: float = 0.6
    thinking: bool = True
    seed: int = 0
    max_batch_size: int = 64
    device: str | None = None
    out: str | None = None  # JSON with the summary and every round of every problem

    def validate(self) -> None:
        from ..tasks import VERIFICATION_TASKS

        for t in self.tasks:
            get_task(t)  # unknown names raise, naming the known ones
            if t in VERIFICATION_TASKS:
                raise ValueError(f"SelfRefineConfig.tasks: {t!r} is a verification task; give the task to solve")
        if self.num_problems < 1:
            raise ValueError(f"SelfRefineConfig.num_problems must be >= 1, got {self.num_problems}")


def run_self_refine(cfg: SelfRefineConfig, progress=None) -> dict:
    """Held-out problems -> self_refine -> summary (written to cfg.out as JSON when set)."""
    from ..engine import Engine
    from ..tasks import make_problems
    from ..tokenizer import Tokenizer
    from . import common as C
    from .evaluate import load_any_model

    cfg.validate()
    model = load_any_model(cfg.model, C.pick_device(cfg.device)).eval()
    tok = Tokenizer.load(cfg.model)
    problems = [p for t in cfg.tasks for lvl in cfg.levels for lang in cfg.langs
                for p in make_problems(t, cfg.num_problems, lvl, lang, seed=cfg.seed, split="test")]
    longest = max(len(tok.encode(p.prompt)) for p in problems)
    # a verification / refinement prompt holds the problem, a solution and a review
    engine = Engine(model, tok, max_batch_size=cfg.max_batch_size, max_len=3 * cfg.max_tokens + longest + 256)
    results = self_refine(engine, problems, cfg.rounds, cfg.n_verify, cfg.meta_verify, cfg.max_tokens,
                          cfg.temperature, cfg.thinking, seed=cfg.seed, progress=progress)
    res = {"summary": summarize(results), "config": dataclasses.asdict(cfg),
           "problems": [{"problem": r.problem, "best": r.best, "rounds": [dataclasses.asdict(x) for x in r.rounds]}
                        for r in results]}
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        C.atomic_write_text(Path(cfg.out), json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    return res
