"""Held-out evaluation on the verifiable tasks: pass@1 averaged over k samples, maj@k (majority vote
over the extracted answers, DeepSeek's cons@k), format rate and mean completion length.

    evaluate(EvalConfig(model="runs/sft/model", out="eval.json")) -> dict
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import common as C


@dataclass
class EvalConfig:
    model: str = "runs/nanoseek/grpo/model"  # a model folder (DeepSeek or dense student) with tokenizer files
    out: str | None = None  # JSON file to write; None = do not write
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    levels: list[int] = field(default_factory=lambda: [2])  # the level `nanoseek run` judges
    langs: list[str] = field(default_factory=lambda: ["en"])
    jsonl: str | None = None  # a user task file of {"prompt", "answer"} lines, checked with math-verify
    num_problems: int = 50  # per (task, level, lang)
    k: int = 4  # samples per problem
    temperature: float = 0.6  # R1's evaluation setting
    top_p: float = 0.95
    max_tokens: int = 128
    thinking: bool = True
    prompt_format: str = "chat"  # chat: the V3.1 template; raw: the problem text as-is (CLI --no-chat-template)
    answer_format: str = "auto"  # sentence | bare | auto (bare with raw prompts or thinking off; see rewards)
    tools: list[str] = field(default_factory=list)  # built-in tools the model may call: calculator, python
    max_tool_turns: int = 0  # tool rounds per completion at most; 0 = no tools (nanoseek.train.agentic)
    tool_schemas: bool = False  # also put the tools' `## Tools` section (V3.1 system prompt) into the prompt
    seed: int = 1234
    max_batch_size: int = 64
    num_transcripts: int = 3
    device: str | None = None
    quantize: str | None = None  # load-time weight format: fp32 bf16 int8 int8-g128 int4-g128 fp8 (nanoseek.quant)

    def __post_init__(self):
        if self.quantize is not None:
            from ..quant import check_format

            check_format(self.quantize)
        C.validate_fields(self, [
            ("k", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            ("num_problems", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            ("temperature", lambda v: v >= 0, "must be >= 0"),
            ("max_tokens", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            ("prompt_format", lambda v: v in ("chat", "raw"), "must be chat or raw"),
            ("answer_format", lambda v: v in ("auto", "sentence", "bare"), "must be auto, sentence or bare"),
        ])
        from .agentic import check_tool_options

        check_tool_options("EvalConfig", self.tools, self.max_tool_turns, self.prompt_format)


def load_any_model(path, device="cpu", quantize: str | None = None):
    """A DeepSeek model or a dense (Qwen2-layout) one, by config.json's model_type: nanoseek.model.load_model;
    quantize: weight format to quantise to at load (nanoseek.quant.load_for_inference; quantised folders load
    as stored either way)."""
    from ..quant import load_for_inference

    return load_for_inference(path, quantize, device)


def held_out_problems(cfg: EvalConfig) -> list:
    from ..tasks import load_jsonl_task, make_problems, register_task

    problems = []
    if cfg.jsonl:
        task = register_task(load_jsonl_task(cfg.jsonl), overwrite=True)
        problems += task.problems[: cfg.num_problems]
    for t in cfg.tasks:
        for lvl in cfg.levels:
            for lang in cfg.langs:
                problems += make_problems(t, cfg.num_problems, level=lvl, lang=lang, seed=cfg.seed, split="test")
    return problems


def prompt_ids(tokenizer, problem, thinking: bool, prompt_format: str = "chat", tools: list | None = None) -> list[int]:
    """The prompt of a problem: the chat template's generation prompt (thinking on or off; tools: OpenAI tool
    schemas for its system prompt), or with prompt_format="raw" the problem's text encoded as-is (a BOS only if
    the tokenizer's config adds one)."""
    if prompt_format == "raw":
        return tokenizer.encode_prompt(problem.prompt)
    if prompt_format != "chat":
        raise ValueError(f"prompt_format must be chat or raw, got {prompt_format!r}")
    return tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}], thinking=thinking,
                                         add_generation_prompt=True, tools=tools)


@torch.no_grad()
def score_problems(model, tokenizer, problems, k: int = 4, temperature: float = 0.6, top_p: float = 0.95,
                   max_tokens: int = 128, thinking: bool = True, seed: int = 0, max_batch_size: int = 64,
                   num_transcripts: int = 3, prompt_format: str = "chat", answer_format: str = "auto",
                   tools=None) -> dict:
    """pass@1, maj@k, format rate, length and transcripts of k samples per problem; tools: an agentic.ToolUse
    (multi-turn generation that runs the model's tool calls) or None."""
    from ..engine import Engine, SamplingParams
    from . import agentic
    from ..tasks import get_task
    from .rewards import accuracy_reward, bare_answers, extract_answer, format_reward, resolve_answer_format, split_completion

    if not problems:
        raise ValueError("no problems to evaluate")
    was_training = model.training
    bare = resolve_answer_format(answer_format, prompt_format, thinking) == "bare"
    prompts = [prompt_ids(tokenizer, p, thinking, prompt_format, agentic.prompt_tools(tools)) for p in problems]
    max_len = max(len(p) for p in prompts) + max_tokens + 1
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_len=max_len)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                            n=k, seed=seed)
    outs = agentic.generate(engine, tokenizer, prompts, params, tools)  # = engine.generate without tools
    per_task: dict[str, dict] = {}
    pass1, maj, fmt, lengths, transcripts = [], [], [], [], []
    for prob, out in zip(problems, outs):
        texts = [c.text for c in out.outputs]
        correct = [accuracy_reward(t, prob, thinking=thinking, bare=bare) for t in texts]
        regions = [split_completion(t, thinking=thinking)[1] for t in texts]
        answers = [extract_answer(r) or (next(iter(bare_answers(r)), None) if bare else None) for r in regions]
        votes = Counter(a for a in answers if a)
        top = votes.most_common(1)[0][0] if votes else None
        maj_ok = float(top is not None and get_task(prob.task).verify(prob, top)) if top is not None else 0.0
        p1 = sum(correct) / k
        pass1.append(p1)
        maj.append(maj_ok)
        fmt += [format_reward(t, thinking=thinking) for t in texts]
        lengths += [len(c.token_ids) for c in out.outputs]
        d = per_task.setdefault(f"{prob.task}/L{prob.level}/{prob.lang}", {"pass@1": [], f"maj@{k}": []})
        d["pass@1"].append(p1)
        d[f"maj@{k}"].append(maj_ok)
        if len(transcripts) < num_transcripts:
            transcripts.append({"prompt": prob.prompt, "completion": texts[0], "answer": prob.answer,
                                "correct": bool(correct[0])})
    model.train(was_training)
    mean = lambda xs: sum(xs) / max(1, len(xs))
    return {
        "pass@1": mean(pass1), "pass@1_se": standard_error(pass1), f"maj@{k}": mean(maj), "format_rate": mean(fmt),
        "mean_length": mean(lengths), "num_problems": len(problems), "k": k,
        "per_task": {name: {**{m: mean(v) for m, v in d.items()}, "pass@1_se": standard_error(d["pass@1"]),
                            "num_problems": len(d["pass@1"])} for name, d in per_task.items()},
        "transcripts": transcripts,
    }


def standard_error(scores: list[float]) -> float:
    """Standard error of the mean of per-problem scores: with one sample per problem (scores 0 / 1) the
    binomial sqrt(p (1 - p) / n); with k samples the spread of the per-problem pass@1 over problems."""
    n = len(scores)
    if n == 0:
        return float("nan")
    m = sum(scores) / n
    return (sum((x - m) ** 2 for x in scores) / n / n) ** 0.5


def evaluate(cfg: EvalConfig) -> dict:
    from ..tokenizer import Tokenizer
    from . import agentic

    device = C.pick_device(cfg.device)
    model = load_any_model(cfg.model, device, cfg.quantize).eval()
    tokenizer = Tokenizer.load(cfg.model)
    res = score_problems(model, tokenizer, held_out_problems(cfg), cfg.k, cfg.temperature, cfg.top_p, cfg.max_tokens,
                         cfg.thinking, cfg.seed, cfg.max_batch_size, cfg.num_transcripts, cfg.prompt_format,
                         cfg.answer_format, agentic.tool_use(cfg.tools, cfg.max_tool_turns, cfg.thinking,
                                                             cfg.tool_schemas))
    res["model"] = str(cfg.model)
    res["config"] = dataclasses.asdict(cfg)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        C.atomic_write_text(Path(cfg.out), json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    return res
