"""Rejection sampling (R1, stage 3): sample k completions per prompt from the RL model, keep the verified
correct ones, drop mixed-language, overlong and malformed chains of thought, and write SFT JSONL.

    rejection_sample(RejectionConfig(model="runs/grpo/model", out="runs/rs/data.jsonl")) -> (path, stats)

Each kept record is {"messages": [{"role": "user", "content": prompt},
{"role": "assistant", "content": answer, "reasoning_content": reasoning}], "meta": {...}}, the format
`nanoseek sft --data` reads. At most `keep_per_prompt` distinct completions are kept per prompt.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


from . import common as C


@dataclass
class RejectionConfig:
    model: str = "runs/nanoseek/grpo/model"  # default: the RL model `nanoseek run` writes
    out: str = "runs/rejection/data.jsonl"
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    levels: list[int] = field(default_factory=lambda: [1])
    langs: list[str] = field(default_factory=lambda: ["en"])
    jsonl: str | None = None  # user prompts {"prompt", "answer"} (math-verify)
    num_prompts: int = 200
    k: int = 4  # samples per prompt
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 96
    thinking: bool = True
    prompt_format: str = "chat"  # chat: the V3.1 template; raw: the problem text as-is (CLI --no-chat-template)
    answer_format: str = "auto"  # sentence | bare | auto (bare with raw prompts or thinking off; see rewards)
    min_language_consistency: float = 0.9  # share of the CoT in the prompt's language
    max_completion_tokens: int | None = None  # overlong filter; None = anything that finished before max_tokens
    keep_per_prompt: int = 1
    seed: int = 4321
    max_batch_size: int = 64
    device: str | None = None

    def __post_init__(self):
        C.validate_fields(self, [
            ("num_prompts", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            ("k", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            ("temperature", lambda v: v > 0, "must be > 0"),
            ("min_language_consistency", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            ("keep_per_prompt", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            ("prompt_format", lambda v: v in ("chat", "raw"), "must be chat or raw"),
            ("answer_format", lambda v: v in ("auto", "sentence", "bare"), "must be auto, sentence or bare"),
        ])


def rejection_sample(cfg: RejectionConfig, model=None, tokenizer=None) -> tuple[Path, dict]:
    from ..engine import Engine, SamplingParams
    from ..tasks import load_jsonl_task, make_problems, register_task
    from ..tokenizer import Tokenizer, parse_completion
    from .evaluate import load_any_model, prompt_ids
    from .rewards import accuracy_reward, format_reward, language_consistency, resolve_answer_format

    device = C.pick_device(cfg.device)
    model = model if model is not None else load_any_model(cfg.model, device)
    tokenizer = tokenizer if tokenizer is not None else Tokenizer.load(cfg.model)
    problems = []
    if cfg.jsonl:
        problems += register_task(load_jsonl_task(cfg.jsonl), overwrite=True).problems[: cfg.num_prompts]
    combos = [(t, lvl, lang) for t in cfg.tasks for lvl in cfg.levels for lang in cfg.langs]
    per = max(1, cfg.num_prompts // max(1, len(combos)))
    for t, lvl, lang in combos:  # train split: the held-out problems stay unseen
        problems += make_problems(t, per, level=lvl, lang=lang, seed=cfg.seed, split="train")
    bare = resolve_answer_format(cfg.answer_format, cfg.prompt_format, cfg.thinking) == "bare"
    prompts = [prompt_ids(tokenizer, p, cfg.thinking, cfg.prompt_format) for p in problems]
    engine = Engine(model.eval(), tokenizer, max_batch_size=cfg.max_batch_size,
                    max_len=max(len(p) for p in prompts) + cfg.max_tokens + 1)
    outs = engine.generate(prompts, SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                                   top_p=cfg.top_p, n=cfg.k, seed=cfg.seed))
    stats = {"prompts": len(problems), "samples": 0, "correct": 0, "kept": 0, "dropped_overlong": 0,
             "dropped_mixed_language": 0, "dropped_format": 0, "duplicates": 0, "prompts_with_a_kept_sample": 0}
    records = []
    limit = cfg.max_completion_tokens or cfg.max_tokens
    for prob, out in zip(problems, outs):
        kept, seen = 0, set()
        for c in out.outputs:
            stats["samples"] += 1
            if not accuracy_reward(c.text, prob, thinking=cfg.thinking, bare=bare):
                continue
            stats["correct"] += 1
            if c.finish_reason == "length" or len(c.token_ids) > limit:
                stats["dropped_overlong"] += 1
                continue
            if not bare and not format_reward(c.text, thinking=cfg.thinking):  # bare answers have no format to check
                stats["dropped_format"] += 1
                continue
            reasoning, answer = parse_completion(c.text, thinking=cfg.thinking)
            if language_consistency(reasoning, prob.lang) < cfg.min_language_consistency:
                stats["dropped_mixed_language"] += 1
                continue
            if (reasoning, answer) in seen:
                stats["duplicates"] += 1
                continue
            if kept >= cfg.keep_per_prompt:
                continue
            seen.add((reasoning, answer))
            kept += 1
            records.append({"messages": [{"role": "user", "content": prob.prompt},
                                         {"role": "assistant", "content": answer, "reasoning_content": reasoning}],
                            "meta": {"task": prob.task, "level": prob.level, "lang": prob.lang, "answer": prob.answer}})
        stats["prompts_with_a_kept_sample"] += kept > 0
    stats["kept"] = len(records)
    stats["accept_rate"] = stats["kept"] / max(1, stats["samples"])
    out_path = Path(cfg.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    C.atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    C.atomic_write_text(out_path.with_suffix(".stats.json"),
                        json.dumps({**stats, "config": dataclasses.asdict(cfg)}, indent=2) + "\n")
    return out_path, stats
