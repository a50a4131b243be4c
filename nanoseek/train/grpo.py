"""GRPO with verifiable rewards: the R1 recipe and the DeepSeek-V3.2 stabilisers.

Each step: draw P training problems, sample G completions per prompt with the engine (log-probs,
sampling masks and expert routing recorded), score them with the rewards, turn rewards into group
advantages, then run `num_iterations` optimizer steps over the rollout, each accumulating over
minibatches, with the clipped objective against the stored sampler log-probs (pi_old), or with truncated
importance sampling (`importance_sampling_correction`) against the trainer's own pre-update log-probs,
each token weighted by min(pi_old_trainer / pi_sampler, cap). Every completion has its own random stream,
seeded from (seed, step, round, problem, sample).

V3.2 options (on by default): unbiased KL (k3 reweighted by pi_theta/pi_old), per-domain KL weight
(`domain_beta`, 0 for math is often best), off-policy sequence masking (`off_policy_delta`), keep
routing (replay the sampler's experts when computing training log-probs), keep sampling mask
(renormalise pi_theta over the sampler's top-p/top-k support). DAPO / Dr. GRPO options: clip-higher
(`eps_high`), token-level (`dapo`) or constant-normaliser (`dr_grpo`) aggregation, mean-only
advantages (`scale_rewards="none"`), dynamic sampling (refilling the batch with informative groups),
truncated-completion masking. V3.2-Speciale
(`speciale=True`, extended thinking): reasoning tasks only, with a relaxed length penalty (`speciale_config`).
Agentic RL (`tools`, `max_tool_turns`; nanoseek.train.agentic): multi-turn rollouts that run the model's tool calls
and continue after their outputs, which are masked out of the loss.

    grpo(GRPOConfig(init_from="runs/sft/model", out_dir="runs/grpo")) -> Path

Any model, prompt and reward: `init_from` is a DeepSeek folder or a Qwen2-layout dense one (nanoseek's student
or a transformers Qwen2ForCausalLM folder; nanoseek.model.load_model), with any tokenizer when
prompt_format="raw" (the problem text as-is; the chat template needs DeepSeek's special tokens). Rewards are
the built-ins, per-sample callables or TRL-style batched ones fn(prompts, completions, **columns) (in Python
through `extra_rewards`, or `reward_funcs=["module:function=weight"]`); `jsonl` alone trains on that file only,
its held-out set is `eval_jsonl` or an explicit `eval_fraction`. TRL's option names are accepted by
`GRPOConfig.from_trl(**kw)` / `from_dict` and on the CLI (docs/training.md has the table).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable
from pathlib import Path

import torch

from .. import precision as P
from . import common as C
from .trainer import LOOP_FIELD_CHECKS, Trainer
from .grpo_loss import (group_advantages, grpo_loss, loss_token_count, off_policy_sequence_mask, sampling_mask_logprobs,
                        token_entropy, token_logprobs, truncated_importance_weights, zero_spread_groups)


# TRL GRPOConfig / GRPOTrainer names -> nanoseek's, where the idea is the same (names equal in both, such as
# num_generations, loss_type, beta, scale_rewards, temperature, top_p, top_k, num_iterations, weight_decay,
# adam_beta1/2, adam_epsilon and seed, need no entry). The CLI takes these as flags too (cli._aliases).
TRL_NAMES = {
    "max_completion_length": "max_tokens",
    "epsilon": "eps_low",
    "epsilon_high": "eps_high",
    "mask_truncated_completions": "mask_truncated",
    "per_device_train_batch_size": "completions_per_step",  # divided by num_generations: prompts_per_step
    "generation_batch_size": "completions_per_step",
    "learning_rate": "lr",
    "max_grad_norm": "grad_clip",
    "max_steps": "steps",
    "warmup_steps": "warmup",
    "lr_scheduler_type": "lr_schedule",
    "output_dir": "out_dir",
    "model_name_or_path": "init_from",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "vllm_importance_sampling_correction": "importance_sampling_correction",
    "vllm_importance_sampling_cap": "importance_sampling_cap",
}


@dataclass
class GRPOConfig:
    init_from: str = "runs/sft/model"  # a DeepSeek or Qwen2-layout (dense / transformers) model folder
    out_dir: str = "runs/grpo"
    # tasks
    tasks: list[str] | None = None  # built-in tasks; None = ["arithmetic"], or none when jsonl is given
    levels: list[int] = field(default_factory=lambda: [1])
    langs: list[str] = field(default_factory=lambda: ["en"])
    jsonl: str | None = None  # a user task file of {"prompt", ["answer"], extra columns...} lines
    eval_jsonl: str | None = None  # the held-out set of a user task (a separate file)
    eval_fraction: float | None = None  # or: hold out this fraction of `jsonl` (seeded); None = no jsonl eval
    thinking: bool = True
    prompt_format: str = "chat"  # chat: the V3.1 template; raw: the problem text as-is (CLI --no-chat-template)
    answer_format: str = "auto"  # accuracy reward: sentence | bare | auto (bare with raw or thinking off)
    # agentic RL (nanoseek.train.agentic): multi-turn rollouts that run the model's tool calls
    tools: list[str] = field(default_factory=list)  # built-in tools rollouts may call: calculator, python
    max_tool_turns: int = 0  # tool rounds per completion at most; 0 = single-turn rollouts, no tools
    tool_schemas: bool = False  # also put the tools' `## Tools` section (V3.1 system prompt) into the prompt
    # sampling
    steps: int = 40
    prompts_per_step: int = 8
    num_generations: int = 8  # G
    completions_per_step: int | None = None  # TRL's per_device_train_batch_size; sets prompts_per_step = it / G
    max_tokens: int = 96
    rollout_batch_size: int = 256  # sequences the engine decodes together (a whole rollout, up to this)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # optimisation
    lr: float = 1e-5
    warmup: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after warmup, down to min_lr_ratio * lr)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95  # TRL / transformers default 0.999
    adam_epsilon: float = 1e-8
    grad_clip: float = 1.0  # TRL's max_grad_norm
    # fp32 | bf16 (bf16 weights for rollouts and training, fp32 masters and AdamW state) | amp; auto: fp32 on CPU,
    # amp on GPU (nanoseek.precision)
    precision: str = "auto"
    num_iterations: int = 1  # optimizer steps per rollout (mu), reusing the stored old log-probs
    minibatch_size: int = 16  # sequences per forward/backward
    skip_zero_advantage: bool = True  # no forward/backward for rows with A = 0 and no KL term (same gradient)
    share_prompt: bool = True  # a group's completions share one copy of the prompt in the training forward
    # objective
    eps_low: float = 0.2
    eps_high: float = 0.28  # clip-higher (DAPO); set equal to eps_low for the symmetric R1 clip
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"  # group | batch | none (mean-only advantages)
    beta: float = 0.0  # KL weight; 0 = no reference model
    domain_beta: dict = field(default_factory=dict)  # task name -> KL weight, overrides beta (V3.2)
    kl_kind: str = "k3"
    unbiased_kl: bool = True
    ref_refresh_every: int = 0  # copy the policy into the reference every n steps; 0 = never
    off_policy_delta: float | None = 0.5  # V3.2 sequence masking threshold; None = off
    keep_routing: bool = True
    keep_sampling_mask: bool = True
    dynamic_sampling: bool = False  # DAPO: train on groups whose rewards differ, drawing more problems to refill
    # step t+1's groups are sampled in the background, by a copy of the policy as it was at the start of step t,
    # while step t trains; one process only (not under torchrun)
    async_rollouts: bool = False  # rollouts one step ahead, beside the update (one step off-policy; AsyncRollouts)
    # "process" = a forked worker process on one thread (no GIL shared with the update; Linux, CPU), "thread" = a
    # thread of this process (half the torch threads each side), "auto" = process where the rollouts would get one
    # thread anyway (at most 3 torch threads) and fork exists, else thread
    async_worker: str = "auto"  # where async rollouts run: process | thread | auto
    max_resample_rounds: int = 4  # dynamic sampling: extra rollout rounds per step at most (then train on fewer)
    mask_truncated: bool = False
    importance_sampling_correction: bool = False  # TIS: weight tokens by min(pi_old_trainer / pi_sampler, cap)
    importance_sampling_cap: float = 2.0  # C of truncated importance sampling
    # rewards
    reward_funcs: list[str] = field(default_factory=list)  # "module:function[=weight]" or a built-in name (CLI --reward)
    # None = auto: {"accuracy": 1.0, "format": 0.2} (no format with bare answers) when no user reward is given,
    # else only the user's rewards; a dict of name -> weight; or a list aligned with reward_funcs (TRL's form)
    reward_weights: dict | list | None = None
    length_max: int | None = None  # length penalty window (tokens); None = max_tokens
    length_buffer: int = 32
    # bookkeeping
    eval: bool = True  # held-out evaluation at step 0, every eval_every steps and at the end
    eval_metric: str = "auto"  # accuracy (greedy pass@1) | reward (mean training reward, greedy) | auto
    eval_every: int = 10  # 0 = no evaluation
    eval_problems: int = 64
    eval_levels: list[int] | None = None  # levels of the held-out curve; None = the training levels
    eval_max_tokens: int | None = None
    save_every: int = 10
    log_every: int = 1
    keep_checkpoints: int = 2
    seed: int = 0
    device: str | None = None
    resume: bool = True
    stop_after: int | None = None  # checkpoint and stop at this step (a later call resumes)
    time_limit_s: float | None = None  # wall-clock budget: evaluate, checkpoint and finish once it is spent
    tensorboard: bool = True
    speciale: bool = False  # V3.2-Speciale: reasoning tasks only, relaxed length penalty (see speciale_config)
    ep: int = 1  # expert-parallel ranks under torchrun; each rank rolls out prompts_per_step / world_size groups

    def __post_init__(self):
        if self.async_worker not in ("auto", "process", "thread"):
            raise ValueError(f"GRPOConfig.async_worker must be auto, process or thread, got {self.async_worker!r}")
        if isinstance(self.scale_rewards, bool) or self.scale_rewards in ("true", "True", "false", "False"):
            self.scale_rewards = "group" if self.scale_rewards in (True, "true", "True") else "none"  # TRL's old bool
        if isinstance(self.reward_weights, (int, float)) and not isinstance(self.reward_weights, bool):
            self.reward_weights = [float(self.reward_weights)]  # CLI: --reward-weights 0.5 (one reward)
        if self.tasks is None:  # --jsonl alone trains on that file only
            self.tasks = [] if self.jsonl else ["arithmetic"]
        n = self.completions_per_step
        if n is not None:
            if not isinstance(n, int) or n < 1 or not isinstance(self.num_generations, int) or n % self.num_generations:
                raise ValueError(f"GRPOConfig.completions_per_step (TRL's per_device_train_batch_size) must be a positive "
                                 f"multiple of num_generations={self.num_generations}, got {n!r}")
            self.prompts_per_step = n // self.num_generations
        C.validate_fields(self, [
            ("steps", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("prompts_per_step", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("num_generations", lambda v: isinstance(v, int) and v >= 2, "must be an integer >= 2 (a group)"),
            ("max_tokens", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("temperature", lambda v: v > 0, "must be > 0 (GRPO samples)"),
            ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
            ("top_k", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0"),
            ("lr", lambda v: v > 0, "must be > 0"),
            ("precision", lambda v: v in ("auto", "fp32", "bf16", "amp"),
             "must be auto, fp32, bf16 or amp (GRPO has no FP8 training path)"),
            ("lr_schedule", lambda v: v in ("constant", "cosine"), "must be constant or cosine"),
            ("min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            ("num_iterations", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            ("minibatch_size", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            ("rollout_batch_size", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            ("loss_type", lambda v: v in ("grpo", "bnpo", "dr_grpo", "dapo"), "must be grpo, bnpo, dr_grpo or dapo"),
            ("scale_rewards", lambda v: v in ("group", "batch", "none"), "must be group, batch or none"),
            ("kl_kind", lambda v: v in ("k1", "k2", "k3"), "must be k1, k2 or k3"),
            ("beta", lambda v: v >= 0, "must be >= 0"),
            ("eps_low", lambda v: 0 < v < 1, "must be in (0, 1)"),
            ("eps_high", lambda v: v > 0, "must be > 0"),
            ("max_resample_rounds", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0"),
            ("importance_sampling_cap", lambda v: v > 0, "must be > 0"),
            ("log_every", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            ("eval_every", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0 (0 = no evaluation)"),
            ("eval_metric", lambda v: v in ("auto", "accuracy", "reward"), "must be auto, accuracy or reward"),
            ("prompt_format", lambda v: v in ("chat", "raw"), "must be chat or raw"),
            ("answer_format", lambda v: v in ("auto", "sentence", "bare"), "must be auto, sentence or bare"),
            ("eval_fraction", lambda v: v is None or 0 < v < 1, "must be None or in (0, 1)"),
            ("adam_beta1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
            ("adam_beta2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
            ("adam_epsilon", lambda v: v > 0, "must be > 0"),
            ("weight_decay", lambda v: v >= 0, "must be >= 0"),
            ("grad_clip", lambda v: v > 0, "must be > 0 (TRL's max_grad_norm)"),
            ("save_every", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            ("ep", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be an integer >= 1"),
            *LOOP_FIELD_CHECKS,
        ])
        from ..tasks import TASKS
        from .agentic import check_tool_options

        check_tool_options("GRPOConfig", self.tools, self.max_tool_turns, self.prompt_format)
        if not self.tasks and not self.jsonl:
            raise ValueError("GRPOConfig.tasks: no tasks and no jsonl: nothing to train on")
        if (self.eval_jsonl or self.eval_fraction is not None) and not self.jsonl:
            raise ValueError("GRPOConfig.eval_jsonl / eval_fraction: the held-out set of a user task needs jsonl")
        if self.eval_jsonl and self.eval_fraction is not None:
            raise ValueError("GRPOConfig: give eval_jsonl or eval_fraction, not both")
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"GRPOConfig.tasks: unknown task {t!r}; choose from {sorted(TASKS)}")
        if isinstance(self.reward_weights, list):
            if not self.reward_funcs:
                pass  # aligned with grpo(extra_rewards=...) (checked there)
            elif len(self.reward_weights) != len(self.reward_funcs):
                raise ValueError(f"GRPOConfig.reward_weights: {len(self.reward_weights)} weights for "
                                 f"{len(self.reward_funcs)} reward_funcs")
        elif isinstance(self.reward_weights, dict):
            named = {spec.rpartition("=")[0] if "=" in spec else spec for spec in self.reward_funcs}
            named = {n.rpartition(":")[2] for n in named}
            bad = [k for k in self.reward_weights if k not in ("accuracy", "format", "language", "length") and k not in named]
            if bad:
                raise ValueError(f"GRPOConfig.reward_weights: unknown reward {bad[0]!r} (built-ins: accuracy, format, "
                                 "language, length; user rewards through reward_funcs or grpo(extra_rewards=...))")
        elif self.reward_weights is not None:
            raise ValueError(f"GRPOConfig.reward_weights must be None, a dict or a list, got {self.reward_weights!r}")

    @classmethod
    def from_trl(cls, **kw) -> "GRPOConfig":
        """A config from TRL's GRPOConfig names (and nanoseek's own): max_completion_length, epsilon, epsilon_high,
        mask_truncated_completions, per_device_train_batch_size (completions; times gradient_accumulation_steps),
        learning_rate, max_grad_norm, ... (TRL_NAMES), with TRL's meanings: epsilon_high unset = epsilon (a
        symmetric clip), scale_rewards True/False = group/none, reward_weights a list aligned with reward_funcs.
        Names that exist in neither raise one ValueError. TRL's defaults are not adopted: unset = nanoseek's."""
        kw = dict(kw)
        accum = kw.pop("gradient_accumulation_steps", 1) or 1
        if "per_device_train_batch_size" in kw and accum != 1:
            kw["per_device_train_batch_size"] = kw["per_device_train_batch_size"] * accum
        if "epsilon" in kw and kw.get("epsilon_high") is None and "eps_high" not in kw:
            kw["epsilon_high"] = kw["epsilon"]  # TRL: epsilon_high defaults to epsilon
        if "epsilon_high" in kw and kw["epsilon_high"] is None:
            del kw["epsilon_high"]
        own = {f.name for f in dataclasses.fields(cls)}
        out, unknown = {}, []
        for k, v in kw.items():
            name = TRL_NAMES.get(k, k)
            if name not in own:
                unknown.append(k)
            elif name in out:
                raise ValueError(f"GRPOConfig.from_trl: {k} and another name both set {name}")
            else:
                out[name] = v
        if unknown:
            raise ValueError(f"GRPOConfig.from_trl: no nanoseek option for {', '.join(sorted(unknown))} "
                             "(docs/training.md lists the TRL names nanoseek takes)")
        return cls(**out)

    @classmethod
    def from_dict(cls, d: dict) -> "GRPOConfig":
        """A config from a dict of nanoseek's names and/or TRL's (see from_trl), e.g. a saved grpo_config.json."""
        d = {k: v for k, v in d.items() if k != "speciale"}  # a saved config holds the effective (speciale) values
        return cls.from_trl(**d)

    @property
    def uses_reference(self) -> bool:
        return self.beta > 0 or any(v > 0 for v in self.domain_beta.values())


def grpo_lr(cfg: GRPOConfig, step: int, elapsed_s: float = 0.0) -> float:
    """Learning rate of `step`: linear warmup, then constant or a cosine to min_lr_ratio * lr. With a
    wall-clock budget the cosine follows whichever is further along, the steps or the time (the step
    count a budget allows is not known in advance); a resumed run restarts its clock."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.time_limit_s is not None:
        frac = max(frac, elapsed_s / cfg.time_limit_s)
    frac = min(1.0, frac)
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * frac))


# ---------------------------------------------------------------------------------------------- rollout


SPECIALE_BUDGET = 2.0  # V3.2-Speciale: x2 generation budget and length-penalty window
SPECIALE_LENGTH_WEIGHT = 0.25  # x0.25 length-penalty weight


def speciale_config(cfg: GRPOConfig) -> GRPOConfig:
    """The V3.2-Speciale variant of `cfg` (extended thinking): RL on reasoning tasks only, with the length
    penalty relaxed, so answers may grow longer: max_tokens and the penalty window x2, the length weight
    x0.25. The verifier tasks are not reasoning data and are refused. Returns a new config with
    speciale=False (applying it twice would relax twice)."""
    from ..tasks import VERIFICATION_TASKS

    bad = [t for t in cfg.tasks if t in VERIFICATION_TASKS]
    if bad:
        raise ValueError(f"GRPOConfig.speciale: RL on reasoning tasks only, but tasks include {bad[0]!r}")
    weights = dict(cfg.reward_weights) if isinstance(cfg.reward_weights, dict) else cfg.reward_weights
    if isinstance(weights, dict) and "length" in weights:
        weights["length"] *= SPECIALE_LENGTH_WEIGHT
    window = cfg.length_max or cfg.max_tokens
    return dataclasses.replace(cfg, speciale=False, reward_weights=weights,
                               max_tokens=int(cfg.max_tokens * SPECIALE_BUDGET),
                               length_max=int(window * SPECIALE_BUDGET),
                               eval_max_tokens=None if cfg.eval_max_tokens is None
                               else int(cfg.eval_max_tokens * SPECIALE_BUDGET))


def agentic_tools(cfg: GRPOConfig):
    """The rollouts' agentic.ToolUse, or None without tools (single-turn rollouts)."""
    from .agentic import tool_use

    return tool_use(cfg.tools, cfg.max_tool_turns, cfg.thinking, cfg.tool_schemas)


def draw_problems(cfg: GRPOConfig, step: int, tasks, n: int | None = None, round_: int = 0) -> list:
    """n (default prompts_per_step) training problems, a function of (seed, step, round_) alone, so a resumed run
    draws the same ones; round_ > 0 are dynamic sampling's extra draws."""
    from ..tasks import JsonlTask, sample_problem

    rng = random.Random(f"{cfg.seed}/{step}" if round_ == 0 else f"{cfg.seed}/{step}/{round_}")
    out = []
    for _ in range(cfg.prompts_per_step if n is None else n):
        task = rng.choice(tasks)
        if isinstance(task, JsonlTask) and task.name not in cfg.tasks:
            # a user file: every line is training data (its held-out set is explicit: eval_jsonl / eval_fraction)
            out.append(rng.choice(task.problems))
            continue
        out.append(sample_problem(task, rng, rng.choice(cfg.levels) if task.name in cfg.tasks else 1,
                                  rng.choice(cfg.langs) if task.name in cfg.tasks else task.problems[0].lang,
                                  split="train"))
    return out


@torch.no_grad()
def rollout(model, tokenizer, cfg: GRPOConfig, problems, step: int, round_: int = 0, first: int = 0,
            engines: dict | None = None) -> dict:
    """Sample G completions per problem; returns per-completion metadata. Every completion draws its own
    random stream, seeded from (cfg.seed, step, round_, problem index, sample index): the same problem twice
    in a rollout gets independent samples, and the rollout is reproducible. first: the index of problems[0] in the
    step's draw (a rank's share of it), so a problem gets the same samples at every world size. engines: a dict the
    caller keeps from rollout to rollout, where the Engine is kept (`Engine.reset` before, its cache released
    after); without it a new Engine each call."""
    from ..engine import Engine, SamplingParams, derive_seed
    from . import agentic
    from .evaluate import prompt_ids

    tools = agentic_tools(cfg)
    prompts = [prompt_ids(tokenizer, p, cfg.thinking, cfg.prompt_format, agentic.prompt_tools(tools)) for p in problems]
    moe = any(getattr(layer, "is_moe", False) for layer in model.model.layers)
    max_len = max(len(p) for p in prompts) + cfg.max_tokens + 1
    # One engine batch for the whole rollout when it fits: on a CPU a 128-row decode step costs little more
    # than a 64-row one, so this is ~1.6x faster than two batches of 64.
    batch = min(cfg.rollout_batch_size, len(prompts) * cfg.num_generations)
    engine = (engines or {}).get("rollout")
    if engine is not None and engine.model is model and engine.tokenizer is tokenizer:
        engine.reset(max_batch_size=batch, max_len=max_len)
    else:
        engine = Engine(model, tokenizer, max_batch_size=batch, max_len=max_len)
        if engines is not None:
            engines["rollout"] = engine
    # Without top-p / top-k the support is the whole vocabulary and renormalising over it changes nothing:
    # skip the (len, V) masks.
    truncated_support = cfg.top_p < 1.0 or cfg.top_k > 0
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            n=cfg.num_generations, logprobs=True,
                            return_sampling_mask=cfg.keep_sampling_mask and truncated_support,
                            return_routing=cfg.keep_routing and moe)
    # one seed per problem (the engine derives sample i's stream from it): never one seed for all problems,
    # which would make sample i of every problem draw the same random numbers
    per_prompt = [dataclasses.replace(params, seed=derive_seed(cfg.seed, step, round_, first + j))
                  for j in range(len(prompts))]
    try:
        outs = agentic.generate(engine, tokenizer, prompts, per_prompt, tools)  # = engine.generate without tools
    except BaseException:
        if engines is not None:  # left mid-request: the next rollout makes a new one
            engines.pop("rollout", None)
        raise
    if engines is not None:
        engine.release_cache()
    seqs = []
    for prob, pr, out in zip(problems, prompts, outs):
        for c in out.outputs:
            seqs.append(dict(problem=prob, prompt=pr, completion=c))
    return {"seqs": seqs, "num_forwards": engine.num_forwards}


def build_batch(seqs: list[dict], pad_id: int, moe_layers: int, k: int, keep_mask: bool, keep_routing: bool) -> dict:
    """Right-padded input ids (N, T), completion index (N, L) into the logits, tokens (N, L), loss mask (N, L: 1 on
    generated tokens, 0 on padding and on an agentic completion's tool-output tokens),
    old log-probs (N, L), support masks (N, L, V), forced routing per MoE layer (N, T, K) with -1 = free: the
    sampler's experts at every position it routed (the prompt's from the prefill, then one per sampled token
    but the last), so keep routing replays the whole sequence as V3.2 does."""
    N = len(seqs)
    prompts, comps = [s["prompt"] for s in seqs], [s["completion"] for s in seqs]
    prompt_len = torch.tensor([len(p) for p in prompts])
    completion_len = torch.tensor([len(c.token_ids) for c in comps])
    T, L = int((prompt_len + completion_len).max()), max(1, int(completion_len.max()))

    def padded(rows, width, fill, dtype):  # one tensor from ragged Python lists (a copy per row is 10x slower)
        return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=dtype)
    ids = padded([list(p) + list(c.token_ids) for p, c in zip(prompts, comps)], T, pad_id, torch.long)
    tokens = padded([c.token_ids for c in comps], L, 0, torch.long)
    j = torch.arange(L)
    pos = torch.where(j < completion_len.unsqueeze(1), prompt_len.unsqueeze(1) - 1 + j, 0)  # logits predicting token j
    # agentic rollouts carry a loss mask (0 on tool-output tokens); otherwise every generated token counts
    mask = padded([c.loss_mask if getattr(c, "loss_mask", None) is not None else [1] * len(c.token_ids)
                   for c in comps], L, 0, torch.float32)
    old = padded([c.logprobs if c.token_ids else [] for c in comps], L, 0.0, torch.float32)
    support = None
    if keep_mask and any(c.token_ids and c.sampling_masks is not None for c in comps):
        V = next(c.sampling_masks.shape[-1] for c in comps if c.token_ids and c.sampling_masks is not None)
        support = torch.ones(N, L, V, dtype=torch.bool)
        for n, c in enumerate(comps):
            if c.token_ids and c.sampling_masks is not None:
                support[n, :len(c.token_ids)] = c.sampling_masks
    routing = None
    if keep_routing:  # (T, layers, K) a row: the prefill's experts, then the one per sampled token; -1 = free
        full = torch.full((N, T, moe_layers, k), -1, dtype=torch.long)
        shared, rows, at, parts = {}, [], [], []  # a group's samples share one prompt routing: one write per group
        for n, (p, c) in enumerate(zip(prompts, comps)):
            pr = getattr(c, "prompt_routing", None)
            if pr is not None:
                shared.setdefault(id(pr), (pr, len(p), []))[2].append(n)
            if c.token_ids and c.routing is not None:
                parts.append(c.routing)
                rows += [n] * len(c.routing)
                at += range(len(p) - 1, len(p) - 1 + len(c.routing))
        for pr, P, group in shared.values():
            part = pr[:P - 1]
            full[group, :len(part)] = part
        if parts:
            full[rows, at] = torch.cat(parts)
        routing = list(full.unbind(2))
    return dict(ids=ids, pos=pos, tokens=tokens, mask=mask, old=old, support=support, routing=routing,
                prompt_len=prompt_len, completion_len=completion_len)


def policy_logprobs(model, batch: dict, rows: torch.Tensor, temperature: float, forced: bool, sampling_mask: bool,
                    want_entropy: bool = False, packed: dict | None = None):
    """Log-probs (n, L) of the rows' completion tokens (and their entropies); `packed`: the rows as
    shared_prompt.pack laid them out (one copy of each prompt), else one padded row each."""
    if packed is not None:
        routing = packed["routing"] if forced else None
        out = model(packed["ids"], positions=packed["positions"], attention_mask=packed["mask"],
                    forced_expert_ids=routing, mtp=False)
        logits = out.logits[packed["row"].unsqueeze(1), packed["at"]].float() / temperature
    else:
        ids = batch["ids"][rows]
        routing = [r[rows] for r in batch["routing"]] if (forced and batch["routing"] is not None) else None
        out = model(ids, forced_expert_ids=routing, mtp=False)
        pos = batch["pos"][rows]  # (n, L)
        logits = out.logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, out.logits.shape[-1])).float() / temperature
    tokens, mask = batch["tokens"][rows], batch["mask"][rows]
    if sampling_mask and batch["support"] is not None:
        logp = sampling_mask_logprobs(logits, tokens, batch["support"][rows], mask=mask)
    else:
        logp = token_logprobs(logits, tokens)
    ent = token_entropy(logits.detach()) if want_entropy else None
    return logp, ent


# ---------------------------------------------------------------------------------------------- one step


def sample_groups(model, tokenizer, cfg: GRPOConfig, step: int, tasks, reward_fn, dist=None,
                  engines: dict | None = None) -> dict:
    """Roll out and score the step's groups: {"seqs", "rewards" (N,), "metrics", "num_tokens"}; engines: as in
    `rollout` (the caller's dict, kept from step to step).

    Distributed (world size W > 1): every rank draws the same problems and rolls out and scores its share, the
    groups [r P/W, (r+1) P/W) (a group never splits across ranks), with the samples they get in one process.

    Without dynamic sampling: the prompts_per_step problems of `draw_problems`, G completions each. With it
    (DAPO's dynamic sampling): only groups whose rewards differ are kept, and extra rounds draw more problems
    (`draw_problems(round_=r)`, reproducible on resume) until prompts_per_step such groups are collected or
    `max_resample_rounds` extra rounds have run; then the batch holds fewer groups. Reward, length and
    zero-spread metrics cover every completion sampled (all rounds); `resample_rounds`, `resample_rollouts`
    (extra completions sampled) and `informative_groups` (groups in the batch) are logged with dynamic sampling.
    """
    G, want = cfg.num_generations, cfg.prompts_per_step
    every, kept = [], []  # every sampled completion (metrics); the groups trained on
    rewards_all, rewards_kept, comps_all = [], [], {}
    rnd, n_draw, drawn = 0, want, 0
    while True:
        problems, first = draw_problems(cfg, step, tasks, n=n_draw, round_=rnd), 0
        if dist is not None and dist.world_size > 1:  # this rank's groups
            share = len(problems) // dist.world_size
            first = dist.rank * share
            problems = problems[first:first + share]
        seqs = rollout(model, tokenizer, cfg, problems, step, rnd, first, engines)["seqs"]
        ntok = [len(s["completion"].token_ids) for s in seqs]
        totals, comps = reward_fn.batch([s["problem"].prompt for s in seqs], [s["completion"].text for s in seqs],
                                        [s["problem"] for s in seqs], ntok,
                                        completion_ids=[list(s["completion"].token_ids) for s in seqs],
                                        trainer_state=SimpleNamespace(global_step=step, max_steps=cfg.steps))
        every += seqs
        rewards_all += totals
        for k, v in comps.items():
            comps_all.setdefault(k, []).extend(v)
        drawn += n_draw
        if not cfg.dynamic_sampling:
            kept, rewards_kept = seqs, totals
            break
        informative = (~zero_spread_groups(torch.tensor(totals, dtype=torch.float32), G)).nonzero().flatten().tolist()
        for g in informative[: want - len(kept) // G]:
            kept += seqs[g * G:(g + 1) * G]
            rewards_kept += totals[g * G:(g + 1) * G]
        missing = want - len(kept) // G
        if missing == 0 or rnd == cfg.max_resample_rounds:
            break
        rnd += 1
        rate = (len(rewards_all) // G - int(zero_spread_groups(torch.tensor(rewards_all), G).sum())) / drawn
        n_draw = want if rate == 0 else min(want, math.ceil(missing / rate))  # expected draws to fill the batch
    rewards = torch.tensor(rewards_all, dtype=torch.float32)
    ntok = [len(s["completion"].token_ids) for s in every]
    metrics = {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
               "zero_spread_frac": zero_spread_groups(rewards, G).float().mean().item(),
               "completion_length": sum(ntok) / len(ntok),
               "truncated_frac": sum(s["completion"].finish_reason == "length" for s in every) / len(every)}
    for name, vals in comps_all.items():
        v = torch.tensor(vals, dtype=torch.float32)
        v = v[~v.isnan()]  # a batched reward's None: that sample is left out of its mean
        metrics[f"reward_{name}"] = v.mean().item() if len(v) else float("nan")
        metrics[f"reward_{name}_std"] = v.std().item() if len(v) > 1 else 0.0
    metrics["accuracy"] = metrics.get("reward_accuracy", float("nan"))
    if cfg.max_tool_turns:
        from .agentic import tool_metrics

        metrics.update(tool_metrics([s["completion"] for s in every]))
    if cfg.dynamic_sampling:
        metrics.update(resample_rounds=rnd, resample_rollouts=len(every) - want * G, informative_groups=len(kept) // G)
    return {"seqs": kept, "rewards": torch.tensor(rewards_kept, dtype=torch.float32), "metrics": metrics,
            "num_tokens": sum(ntok)}


def minibatch_weight(loss_type: str, n_rows: int, n_live_rows: int, n_seqs: int, n_live: int) -> float:
    """What a minibatch's loss is multiplied by so the minibatches sum to the loss of the whole batch: dapo's
    normaliser is already the step's token count; grpo averages over the batch's live sequences (not masked as
    truncated), so a minibatch with n_live_rows of them weighs n_live_rows / n_live; bnpo and dr_grpo by rows."""
    if loss_type == "dapo":
        return 1.0
    if loss_type == "grpo":
        return n_live_rows / max(1, n_live)
    return n_rows / max(1, n_seqs)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else ([r.to(device) for r in v] if isinstance(v, list) else v))
            for k, v in batch.items()}


def shared_prompt_pack(cfg: GRPOConfig, host: dict, rows: torch.Tensor, pad_id: int, device) -> dict | None:
    """The minibatch's rows with one copy of each shared prompt (shared_prompt.pack), on `device`; None (one
    padded row each) when share_prompt is off or no two rows share a prompt."""
    if not cfg.share_prompt:
        return None
    from .shared_prompt import pack, prompt_groups

    rows = rows.cpu()
    if len(prompt_groups(host, rows.tolist())) == len(rows):
        return None
    return to_device(pack(host, rows, pad_id), device)


@dataclass
class StepBatch:
    """One rollout laid out for the optimizer steps: the build_batch tensors on the device, the shared-prompt
    layout of each minibatch (built once, `packed(rows)`), the advantages, which rows are truncated / live, each
    row's KL coefficient, the rows that need a forward and backward, the loss normalisers (every rank's), the
    reference policy's log-probs of the trained rows and the trainer's own old log-probs (TIS)."""
    host: dict
    batch: dict
    adv: torch.Tensor
    trunc: torch.Tensor
    live: torch.Tensor
    beta: torch.Tensor
    rows_all: torch.Tensor
    train_rows: torch.Tensor
    total_tokens: torch.Tensor
    n_seqs: int
    n_live: int
    kl: bool  # a reference policy (beta > 0)
    packs: dict = field(default_factory=dict)
    ref_lp: torch.Tensor | None = None
    trainer_old: torch.Tensor | None = None

    def packed(self, cfg: GRPOConfig, rows: torch.Tensor, pad_id: int, device) -> dict | None:
        key = tuple(rows.tolist())
        if key not in self.packs:
            self.packs[key] = shared_prompt_pack(cfg, self.host, rows, pad_id, device)
        return self.packs[key]


def step_batch(ref, cfg: GRPOConfig, seqs: list[dict], adv: torch.Tensor, pad_id: int, moe_layers: int, K: int,
               device, dist=None, ctx=nullcontext()) -> StepBatch:
    """The StepBatch of a rollout. Distributed, the normalisers (sequences, live sequences, dapo's tokens) are
    summed over the ranks."""
    host = build_batch(seqs, pad_id, moe_layers, K, cfg.keep_sampling_mask, cfg.keep_routing)
    batch = to_device(host, device)
    adv_d = adv.to(device)
    trunc = torch.tensor([s["completion"].finish_reason == "length" for s in seqs], device=device)
    live = ~trunc if cfg.mask_truncated else torch.ones_like(trunc)
    beta = torch.tensor([cfg.domain_beta.get(s["problem"].task, cfg.beta) for s in seqs], device=device)
    rows_all = torch.arange(len(seqs), device=device)
    total_tokens = loss_token_count(batch["mask"], trunc, cfg.mask_truncated)  # dapo: the whole step's tokens
    n_seqs, n_live = len(seqs), int(live.sum())  # normalisers count every row, forwarded or not
    if dist is not None and dist.world_size > 1:
        import torch.distributed as torch_dist

        g = torch.tensor([float(total_tokens), n_seqs, n_live], dtype=torch.float64, device=device)
        torch_dist.all_reduce(g, group=dist.dp_group)
        total_tokens, n_seqs, n_live = g[0].to(total_tokens.dtype), int(g[1]), int(g[2])
    train_rows = rows_all
    if cfg.skip_zero_advantage and cfg.loss_type != "bnpo":
        # A row with A = 0 and no KL, or a truncated one under mask_truncated, has zero loss and zero gradient;
        # skipping it leaves the gradient unchanged (the normalisers above count it anyway) and saves its
        # backward pass. Zero-spread groups (often half the batch) are such rows. bnpo's per-minibatch token
        # normaliser would change, so it keeps every row.
        train_rows = rows_all[((adv_d != 0) | (ref is not None)) & live]
    sb = StepBatch(host, batch, adv_d, trunc, live, beta, rows_all, train_rows, total_tokens, n_seqs, n_live,
                   kl=ref is not None)
    mb = cfg.minibatch_size
    if ref is not None and len(train_rows):
        with torch.no_grad(), ctx:
            sb.ref_lp = torch.cat([policy_logprobs(ref, batch, train_rows[i:i + mb], cfg.temperature, False,
                                                   cfg.keep_sampling_mask,
                                                   packed=sb.packed(cfg, train_rows[i:i + mb], pad_id, device))[0]
                                   for i in range(0, len(train_rows), mb)])
    if cfg.importance_sampling_correction:
        sb.trainer_old = torch.zeros_like(batch["old"])
    return sb


def minibatch_loss(model, sb: StepBatch, cfg: GRPOConfig, i: int, it: int, pad_id: int, device, W: int = 1,
                   ctx=nullcontext()):
    """The loss of minibatch i (rows train_rows[i:i + minibatch_size]) in iteration `it`, scaled to its share of the
    step's loss; (loss, grpo_loss statistics, entropies or None, loss mask, idle). idle: this rank has no rows left
    (distributed), so the minibatch is a zero-loss forward on one row."""
    rows = sb.train_rows[i:i + cfg.minibatch_size]
    idle = len(rows) == 0
    if idle:
        rows = sb.rows_all[:1]
    batch = sb.batch
    with ctx:  # the forward under the precision's autocast (amp); logits are upcast to fp32 inside
        logp, ent = policy_logprobs(model, batch, rows, cfg.temperature, cfg.keep_routing, cfg.keep_sampling_mask,
                                    want_entropy=(it == 0), packed=sb.packed(cfg, rows, pad_id, device))
    m, a, sampler_old = batch["mask"][rows], sb.adv[rows], batch["old"][rows]
    old, is_w = sampler_old, None
    if sb.trainer_old is not None:  # TIS: pi_old is the trainer's own log-prob before the first update
        if it == 0 and not idle:
            sb.trainer_old[rows] = logp.detach()
        old = sb.trainer_old[rows]
        is_w = truncated_importance_weights(old, sampler_old, cfg.importance_sampling_cap, m)
    seq_mask = None
    if cfg.off_policy_delta is not None:  # V3.2: the drift from the sampler's own log-probs
        seq_mask = off_policy_sequence_mask(logp.detach(), sampler_old, a, m, cfg.off_policy_delta)
    ref_logp = None if not sb.kl else logp.detach() if idle else sb.ref_lp[i:i + cfg.minibatch_size]
    loss, st = grpo_loss(logp, old, a, m, ref_logp=ref_logp, beta=sb.beta[rows] if sb.kl else 0.0,
                         kl_kind=cfg.kl_kind, unbiased_kl=cfg.unbiased_kl, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                         loss_type=cfg.loss_type, max_completion_length=cfg.max_tokens, seq_mask=seq_mask,
                         truncated=sb.trunc[rows], mask_truncated=cfg.mask_truncated, num_tokens=sb.total_tokens,
                         is_weights=is_w)
    loss = loss * minibatch_weight(cfg.loss_type, len(rows), int(sb.live[rows].sum()), sb.n_seqs, sb.n_live)
    if W > 1:
        loss = loss * (0 if idle else W)  # W x this rank's share of the global loss
    return loss, st, ent, m, idle


def optimise(model, ref, opt, cfg: GRPOConfig, seqs: list[dict], adv: torch.Tensor, pad_id: int, moe_layers: int,
             K: int, device, step: int | None = None, dist=None, ctx=nullcontext(), sb: StepBatch | None = None
             ) -> dict:
    """`num_iterations` optimizer steps over one rollout (GRPO step `step`, for error messages; `sb`: its StepBatch
    when built already, by async rollouts); returns the metrics
    (means over minibatches and iterations): loss, the grpo_loss statistics, entropy (first iteration), trained_frac,
    grad_norm.

    Distributed (world size W > 1; `seqs` are this rank's groups): the normalisers (sequences, live sequences, dapo's
    tokens) count every rank's, each minibatch loss is multiplied by W (FSDP averages the ranks' gradients), and
    every rank runs as many minibatches as the busiest one (the extra ones with a zero loss: FSDP and expert
    parallelism need every rank in every forward and backward). bnpo normalises per minibatch, which differ."""
    sb = sb if sb is not None else step_batch(ref, cfg, seqs, adv, pad_id, moe_layers, K, device, dist, ctx)
    W = 1 if dist is None else dist.world_size
    model.train()
    stats: dict[str, float] = {}
    n_mb = n_mb_total(sb.train_rows, cfg)
    n_batches = -(-len(sb.train_rows) // cfg.minibatch_size)
    if W > 1:  # every rank runs the busiest rank's number of minibatches
        import torch.distributed as torch_dist

        t = torch.tensor([n_batches], device=device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=dist.dp_group)
        n_batches = int(t)
    gnorm = torch.zeros(())
    for it in range(cfg.num_iterations if n_batches else 0):
        loss_sum = 0.0
        for i in range(0, n_batches * cfg.minibatch_size, cfg.minibatch_size):
            loss, st, ent, m, idle = minibatch_loss(model, sb, cfg, i, it, pad_id, device, W, ctx)
            loss.backward()
            loss_sum += float(loss.detach())
            if idle:
                continue
            st.pop("truncated_frac")  # the trained rows' share; the step's own (every completion) is logged
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + float(v) / n_mb / cfg.num_iterations
            if ent is not None:
                stats["entropy"] = stats.get("entropy", 0.0) + float((ent * m).sum() / m.sum().clamp_min(1)) / n_mb
        stats["loss"] = stats.get("loss", 0.0) + loss_sum / cfg.num_iterations
        gnorm = P.clip_grad_norm_(model, opt, cfg.grad_clip)  # over every rank's shards when parallelized
        C.check_finite("grpo", step, f"{cfg.out_dir}/checkpoints", loss=loss_sum, grad_norm=gnorm)  # nothing non-finite is stepped
        opt.step()
        opt.zero_grad(set_to_none=True)
    stats["trained_frac"] = len(sb.train_rows) / max(1, len(seqs))
    stats["grad_norm"] = float(gnorm)
    return stats


# ---------------------------------------------------------------------------------------------- loop


def resolve_rewards(cfg: GRPOConfig, extra_rewards: dict | None = None) -> tuple[dict, dict]:
    """(weights, extra callables) of a run: cfg.reward_funcs (module:function[=w] or built-in names), the Python
    callables of grpo(extra_rewards=...), and cfg.reward_weights (None = auto, a dict, or a list aligned with
    reward_funcs, else with extra_rewards). Auto: only the user's rewards when there are any, else with tools
    (max_tool_turns > 0) agentic.AGENTIC_REWARD_WEIGHTS, else the built-in accuracy (1.0) and, unless answers are
    bare, format (0.2)."""
    from .rewards import parse_reward_specs, resolve_answer_format

    rw = cfg.reward_weights
    extra_rewards = dict(extra_rewards or {})
    spec_w, spec_extra = parse_reward_specs(cfg.reward_funcs, rw if isinstance(rw, list) and cfg.reward_funcs else None)
    clash = set(spec_extra) & set(extra_rewards)
    if clash:
        raise ValueError(f"reward {sorted(clash)[0]!r} is given both in reward_funcs and extra_rewards")
    extra = {**spec_extra, **extra_rewards}
    if isinstance(rw, dict):
        weights = {**spec_w, **rw}
    elif isinstance(rw, list) and not cfg.reward_funcs:
        if len(rw) != len(extra_rewards):
            raise ValueError(f"GRPOConfig.reward_weights: {len(rw)} weights for {len(extra_rewards)} extra_rewards")
        weights = {k: float(w) for k, w in zip(extra_rewards, rw)}
    elif spec_w or extra:
        weights = spec_w
    elif cfg.max_tool_turns:  # agentic RL: V3.2's mix of outcome, length penalty and language consistency
        from .agentic import AGENTIC_REWARD_WEIGHTS

        weights = dict(AGENTIC_REWARD_WEIGHTS)
    else:
        bare = resolve_answer_format(cfg.answer_format, cfg.prompt_format, cfg.thinking) == "bare"
        weights = {"accuracy": 1.0} if bare else {"accuracy": 1.0, "format": 0.2}
    return weights, extra


@torch.no_grad()
def eval_with_reward(model, tokenizer, problems, reward_fn, cfg: GRPOConfig, max_tokens: int) -> dict:
    """The training reward on greedy completions of held-out problems: eval_reward (mean of the totals) and
    eval_reward_<name> per component, plus one sample."""
    from ..engine import Engine, SamplingParams
    from . import agentic
    from .evaluate import prompt_ids

    tools = agentic_tools(cfg)
    prompts = [prompt_ids(tokenizer, p, cfg.thinking, cfg.prompt_format, agentic.prompt_tools(tools)) for p in problems]
    engine = Engine(model, tokenizer, max_batch_size=min(cfg.rollout_batch_size, len(prompts)),
                    max_len=max(len(p) for p in prompts) + max_tokens + 1)
    outs = agentic.generate(engine, tokenizer, prompts,
                            SamplingParams(max_tokens=max_tokens, temperature=0.0, n=1, seed=cfg.seed), tools)
    comps = [o.outputs[0] for o in outs]
    totals, parts = reward_fn.batch([p.prompt for p in problems], [c.text for c in comps], list(problems),
                                    [len(c.token_ids) for c in comps],
                                    completion_ids=[list(c.token_ids) for c in comps])
    res = {"eval_reward": sum(totals) / len(totals), "eval_length": sum(len(c.token_ids) for c in comps) / len(comps),
           "eval_sample": comps[0].text}
    for name, vals in parts.items():
        v = [x for x in vals if not math.isnan(x)]
        res[f"eval_reward_{name}"] = sum(v) / len(v) if v else float("nan")
    return res


def grpo(cfg: GRPOConfig, progress: C.Progress | None = None, extra_rewards: dict | None = None) -> Path:
    """Train; returns the final model folder (or the latest checkpoint when stopped early). extra_rewards:
    {name: callable}, per-sample fn(prompt, completion, problem) -> float or TRL's batched
    fn(prompts, completions, **columns) -> list[float] (nanoseek.train.rewards.is_batched_reward)."""
    from ..model import load_model
    from ..tokenizer import Tokenizer
    from .rewards import RewardConfig, combine_rewards, resolve_answer_format

    speciale = cfg.speciale
    if speciale:
        cfg = speciale_config(cfg)
    for name in ("config.json", "tokenizer.json"):
        if not (Path(cfg.init_from) / name).exists():
            raise ValueError(f"GRPOConfig.init_from: no {name} in {cfg.init_from}")
    run = Trainer("grpo", cfg, progress)  # device, seed, the checkpoint to resume from
    tokenizer = Tokenizer.load(cfg.init_from)
    answer_format = resolve_answer_format(cfg.answer_format, cfg.prompt_format, cfg.thinking)
    if cfg.prompt_format == "chat" and not tokenizer.has_chat_template:
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])  # raises: no DeepSeek tokens, use raw
    if cfg.max_tool_turns:
        from ..tokenizer import TOOL_CALLS_END

        tokenizer.tool_token_id(TOOL_CALLS_END)  # raises: a tokenizer trained before the tool tokens
    weights, extra = resolve_rewards(cfg, extra_rewards)
    eval_metric = cfg.eval_metric
    if eval_metric == "auto":
        eval_metric = "accuracy" if weights.get("accuracy", 0) > 0 or not extra else "reward"
    tasks, held_out = load_tasks(cfg, needs_answer="accuracy" in weights or eval_metric == "accuracy")
    model = load_model(run.resume_from or cfg.init_from, dtype=torch.float32, device=run.device)
    sampler = model  # what the engine samples from (rollouts, evaluation)
    if run.distributed:
        if cfg.prompts_per_step % run.dist.world_size:
            raise ValueError(f"GRPOConfig.prompts_per_step={cfg.prompts_per_step} must be divisible by the world size "
                             f"{run.dist.world_size} (each rank rolls out whole groups)")
        if cfg.dynamic_sampling or cfg.async_rollouts:
            name = "dynamic_sampling" if cfg.dynamic_sampling else "async_rollouts"
            raise ValueError(f"GRPOConfig.{name} does not run distributed yet")
        # each rank decodes its own groups with a plain copy (no collectives inside the engine), refreshed from
        # the sharded model after every step
        sampler = load_model(run.resume_from or cfg.init_from, dtype=torch.float32, device=run.device)
    elif cfg.async_rollouts:  # the background rollouts' own copy, a step behind (AsyncRollouts)
        resumed_sampler = run.resumed and (run.resume_from / "sampler").exists()
        sampler = load_model(run.resume_from / "sampler" if resumed_sampler else run.resume_from or cfg.init_from,
                             dtype=torch.float32, device=run.device)
    ref = None
    if cfg.uses_reference:
        ref_src = run.resume_from / "ref" if run.resumed and (run.resume_from / "ref").exists() else cfg.init_from
        ref = load_model(ref_src, dtype=torch.float32, device=run.device).eval()
        ref.requires_grad_(False)
    # precision wraps the fp32 model from outside (bf16: bf16 weights between steps, so rollouts and training run
    # in bf16, fp32 masters in the optimizer); under torchrun FSDP's policy, the samplers stay fp32 copies
    model, opt, ctx = run.prepare(model, lambda named: C.make_optimizer(
        model, cfg.lr, cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, params=named),
        P.resolve(cfg.precision, device=run.device))
    # the effective settings; "speciale" says they came from speciale_config
    run.restore(opt, config_json=json.dumps({**dataclasses.asdict(cfg), "speciale": speciale}, indent=2) + "\n",
                model=model)
    reward_fn = combine_rewards(weights, extra,
                                RewardConfig(weights=weights, max_len=cfg.length_max or cfg.max_tokens,
                                             length_buffer=cfg.length_buffer, thinking=cfg.thinking,
                                             answer_format=answer_format))
    # the evaluation decodes the trained weights: the sampler's (distributed: the full weights on one rank), or with
    # async rollouts the model's own (the sampler is a step behind and busy)
    evaluate = make_evaluator(cfg, model if cfg.async_rollouts else sampler, tokenizer, held_out, reward_fn,
                              eval_metric, answer_format)
    if evaluate is not None and not run.dist.is_main:
        evaluate = lambda: {}  # rank 0 evaluates (on its sampler, the full weights) and logs
    if not run.resumed and evaluate is not None:
        run.log(0, **evaluate())
    refreshed = lambda step: ref is not None and cfg.ref_refresh_every and step >= cfg.ref_refresh_every
    train_step = make_train_step(cfg, model, ref, tokenizer, tasks, reward_fn, run.device, sampler, run.dist, ctx)
    threads = torch.get_num_threads()
    if cfg.async_rollouts:  # rollouts and updates side by side: a forked worker on one thread, or half the threads each
        worker = train_step.rollouts.worker
        torch.set_num_threads(max(1, threads - 1 if worker == "process" else threads // 2))
        side = "a worker process on 1 torch thread" if worker == "process" else f"a thread on {torch.get_num_threads()}"
        print(f"grpo: async rollouts in {side}, the update on {torch.get_num_threads()}", file=sys.stderr, flush=True)
    try:
        return run.fit(train_step, cfg.steps, model, tokenizer,
                       lr_at=lambda step, elapsed_s: grpo_lr(cfg, step, elapsed_s), evaluate=evaluate,
                       extras=lambda step: {**({"ref": ref} if refreshed(step) else {}),
                                            **({"sampler": sampler} if cfg.async_rollouts else {})} or None,
                       progress_keys={"reward": "reward", "accuracy": "acc"}, record_first_step=False)
    finally:
        train_step.close()
        torch.set_num_threads(threads)


def load_tasks(cfg: GRPOConfig, needs_answer: bool) -> tuple[list, list]:
    """The training tasks (built-ins, then the user's jsonl task, registered) and the user task's held-out
    problems (explicit: eval_jsonl or eval_fraction)."""
    from ..tasks import JsonlTask, get_task, load_jsonl_task, register_task, split_problems

    tasks = [get_task(t) for t in cfg.tasks]
    held_out = []
    if cfg.jsonl:
        user = load_jsonl_task(cfg.jsonl, require_answer=needs_answer)
        if cfg.eval_fraction is not None:
            train, held_out = split_problems(user.problems, cfg.eval_fraction, seed=cfg.seed)
            user = JsonlTask(user.name, train)
        elif cfg.eval_jsonl:
            held_out = load_jsonl_task(cfg.eval_jsonl, name=user.name, require_answer=needs_answer).problems
        tasks.append(register_task(user, overwrite=True))
    return tasks, held_out


def make_evaluator(cfg: GRPOConfig, model, tokenizer, held_out: list, reward_fn, eval_metric: str, answer_format: str):
    """The held-out evaluation (greedy pass@1, or the training reward), or None when evaluation is off."""
    from ..tasks import make_problems
    from .evaluate import score_problems

    eval_levels = cfg.eval_levels or cfg.levels
    eval_set = [p for t in cfg.tasks for lvl in eval_levels for lang in cfg.langs
                for p in make_problems(t, max(1, cfg.eval_problems // (len(cfg.tasks) * len(eval_levels) * len(cfg.langs))),
                                       level=lvl, lang=lang, seed=cfg.seed + 7, split="test")]
    eval_set += held_out[: cfg.eval_problems]
    if not (cfg.eval and cfg.eval_every > 0):
        return None
    if not eval_set:
        print(f"grpo: no held-out problems ({cfg.jsonl} is all training data; give eval_jsonl or eval_fraction): "
              "evaluation off", file=sys.stderr, flush=True)
        return None
    eval_tokens = cfg.eval_max_tokens or cfg.max_tokens

    def run_eval() -> dict:
        model.eval()
        if eval_metric == "reward":
            return eval_with_reward(model, tokenizer, eval_set, reward_fn, cfg, eval_tokens)
        r = score_problems(model, tokenizer, eval_set, k=1, temperature=0.0, max_tokens=eval_tokens,
                           thinking=cfg.thinking, seed=cfg.seed, num_transcripts=1, prompt_format=cfg.prompt_format,
                           answer_format=answer_format, tools=agentic_tools(cfg))
        return {"eval_accuracy": r["pass@1"], "eval_format": r["format_rate"], "eval_length": r["mean_length"],
                "eval_sample": r["transcripts"][0]["completion"] if r["transcripts"] else ""}

    return run_eval


def make_train_step(cfg: GRPOConfig, model, ref, tokenizer, tasks, reward_fn, device, sampler=None, dist=None,
                    ctx=nullcontext()):
    """One GRPO step: sample and score the groups, then `optimise` (num_iterations optimizer steps) on their
    advantages; the reference model is refreshed every ref_refresh_every steps.

    Distributed (world size W > 1, `model` parallelized): `sampler` is each rank's plain copy, which rolls out and
    scores this rank's groups and gets the new weights after the update; the advantages are computed over every
    rank's rewards (all-gathered, so scale_rewards="batch" sees the global batch too) and each rank keeps its own."""
    sampler = model if sampler is None else sampler
    W = 1 if dist is None else dist.world_size
    moe_layers = sum(1 for layer in model.model.layers[: model.config.num_hidden_layers] if layer.is_moe) \
        if hasattr(model.config, "n_routed_experts") else 0
    K = getattr(model.config, "num_experts_per_tok", 1)

    engines: dict = {}  # the rollout Engine, made once (rollout)

    def sample(step: int) -> dict:
        t0 = time.perf_counter()
        sampler.eval()
        sampled = sample_groups(sampler, tokenizer, cfg, step, tasks, reward_fn, dist, engines)
        sampled["metrics"]["sample_s"] = time.perf_counter() - t0
        return sampled

    def sample_and_prepare(step: int) -> dict:
        """Async rollouts: also the update's batch (advantages, padded rows, shared-prompt packs), built on the
        rollout's thread beside the previous update (not with a reference model, whose forward belongs to it)."""
        sampled = sample(step)
        if sampled["seqs"] and ref is None:
            adv = group_advantages(sampled["rewards"], cfg.num_generations, scale=cfg.scale_rewards)
            sb = step_batch(None, cfg, sampled["seqs"], adv, tokenizer.pad_id, moe_layers, K, device)
            for i in range(0, len(sb.train_rows), cfg.minibatch_size):
                sb.packed(cfg, sb.train_rows[i:i + cfg.minibatch_size], tokenizer.pad_id, device)
            sampled["prepared"] = (adv, sb)
        return sampled

    rollouts = AsyncRollouts(cfg, model, sampler, sample_and_prepare) if cfg.async_rollouts else None

    def train_step(step: int, opt) -> dict:
        t0 = time.perf_counter()
        sampled = sample(step) if rollouts is None else rollouts.groups(step)
        seqs, metrics = sampled["seqs"], sampled["metrics"]
        t_sample = metrics["sample_s"]
        if seqs:
            rewards = sampled["rewards"]
            if W > 1:  # every rank holds the same number of groups
                import torch.distributed as torch_dist

                parts = [torch.empty_like(rewards) for _ in range(W)]
                torch_dist.all_gather(parts, rewards, group=dist.dp_group)
                rewards = torch.cat(parts)
            adv, sb = sampled.get("prepared", (None, None))
            if adv is None:
                adv = group_advantages(rewards, cfg.num_generations, scale=cfg.scale_rewards)
            if W > 1:
                n = len(seqs)
                adv = adv[dist.rank * n:(dist.rank + 1) * n]
            metrics.update(optimise(model, ref, opt, cfg, seqs, adv, tokenizer.pad_id, moe_layers, K, device, step,
                                    dist, ctx, sb))
        if sampler is not model and rollouts is None:
            from ..parallel import copy_full_weights

            copy_full_weights(model, sampler)  # the engine samples the next step from the new weights
        if ref is not None and cfg.ref_refresh_every and (step + 1) % cfg.ref_refresh_every == 0:
            ref.load_state_dict(sampler.state_dict() if rollouts is None else model.state_dict())
        metrics["step_s"] = time.perf_counter() - t0
        # sampling throughput (every rank's: the ranks' mean times W)
        metrics["tokens_per_s"] = W * sampled["num_tokens"] / max(t_sample, 1e-9)
        return metrics

    train_step.close = (lambda: rollouts.close(shutdown=True)) if rollouts is not None else (lambda: None)
    train_step.rollouts = rollouts
    return train_step


class AsyncRollouts:
    """GRPOConfig.async_rollouts: while step t trains on its groups, a background worker samples step t+1's from
    `sampler`, a copy of the policy as it was at the start of step t (one step off-policy: the clipped ratio and
    the V3.2 off-policy mask measure the drift against the sampler's own log-probs, as for any stale rollout).
    Checkpoints keep the sampler's weights (`sampler/`), from which a resumed run samples its first step again:
    resume is bit-exact at any step. Rollouts stay a function of (seed, step); only the policy that samples them moves.

    The worker (GRPOConfig.async_worker): "process" forks one worker process at the first step, on one torch thread,
    that shares the sampler's weights (moved to shared memory) and runs `sample` there, returning its groups by
    pickle; rewards and the update's batch are built there too. Nothing of the rollout's Python then competes for
    the trainer's GIL: on the GRPO head-to-head model both sides' Python costs as much as their tensor work, and a
    thread gives each side ~1.3x its time alone (docs/benchmarks.md). Every step's groups come from the worker, the
    first included, so every rollout runs with the same thread count (bit-exact resume). Linux only (fork; one
    thread, as libgomp does not survive a fork into several). A reward function's state changes stay in the worker.
    "thread": a thread of this process (torch ops release the GIL; half the torch threads each side)."""

    def __init__(self, cfg: GRPOConfig, model, sampler, sample: Callable[[int], dict]):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

        if sampler is model:
            raise ValueError("GRPOConfig.async_rollouts needs a sampler apart from the trained model")
        self.cfg, self.model, self.sampler, self.sample = cfg, model, sampler, sample
        can_fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"
        on_cpu = all(p.device.type == "cpu" for p in sampler.parameters())
        if cfg.async_worker == "process" and not (can_fork and on_cpu):
            raise ValueError("GRPOConfig.async_worker='process' forks a worker: it needs Linux and a CPU model "
                             f"(here {sys.platform}, {next(sampler.parameters()).device}); use 'thread'")
        auto = can_fork and on_cpu and torch.get_num_threads() // 2 <= 1
        self.worker = "process" if cfg.async_worker == "process" or (cfg.async_worker == "auto" and auto) else "thread"
        if self.worker == "process":
            try:
                sampler.share_memory()  # the trainer writes each step's weights here; the worker reads them
            except RuntimeError as e:  # /dev/shm too small (a container's 64 MB default) for the sampler's weights
                if cfg.async_worker == "process":
                    raise ValueError(f"GRPOConfig.async_worker='process': the sampler's weights do not fit in shared "
                                     f"memory ({e}); enlarge /dev/shm or use 'thread'") from e
                print(f"grpo: async rollouts on a thread: the sampler's weights do not fit in shared memory ({e})",
                      file=sys.stderr, flush=True)
                self.worker = "thread"
        if self.worker == "process":
            # fork: the worker inherits `sample` (closures, user rewards, registered tasks), nothing is pickled in
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_rollout_worker_init, initargs=(sample, sampler))
        else:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="grpo-rollout")
        self.pending: tuple[int, object] | None = None  # (step, future)
        self.pairs: tuple[list, list] | None = None  # (sampler tensors, model tensors), for sync_weights

    def submit(self, step: int):
        return self.pool.submit(_rollout_in_worker if self.worker == "process" else self.sample, step)

    def groups(self, step: int) -> dict:
        """Step `step`'s sampled groups: prefetched during the step before, or (the first step of a run or of a
        resumed one) sampled now by the sampler as it is (the initial weights, or the checkpoint's sampler);
        then the sampler takes the current weights and step + 1's groups start in the background. Metrics:
        rollout_wait_s (time this step waited for its groups), policy_lag (optimizer steps between the policy
        that sampled them and the one they train)."""
        t0 = time.perf_counter()
        if self.pending is not None and self.pending[0] == step:
            sampled = self._result(step, self.pending[1])
        else:  # nothing prefetched: sampled now (by the worker process, so every step's groups come from it)
            self.close()
            sampled = self._result(step, self.submit(step)) if self.worker == "process" else self.sample(step)
        self.pending = None
        lag = 0 if step == 0 else self.cfg.num_iterations
        sampled["metrics"].update(rollout_wait_s=time.perf_counter() - t0, policy_lag=lag)
        if step + 1 < self.cfg.steps:
            self.sync_weights()
            self.pending = (step + 1, self.submit(step + 1))
        return sampled

    def _result(self, step: int, future) -> dict:
        """The future's groups; a worker process that died (killed, out of memory) is a clear error, not
        concurrent.futures' BrokenProcessPool. An exception raised in the worker (a reward function's) is re-raised
        as itself, with the worker's traceback."""
        from concurrent.futures.process import BrokenProcessPool

        if self.worker == "thread":
            return future.result()
        try:
            return pickle.loads(future.result())
        except BrokenProcessPool as e:
            self.pending = None
            raise RuntimeError(f"grpo: the async rollout worker process died while sampling step {step} (killed, or "
                               "out of memory?); the run's checkpoints are intact: run again to resume, or set "
                               "async_worker='thread'") from e

    @torch.no_grad()
    def sync_weights(self) -> None:
        """The sampler takes the model's weights, in one foreach copy (load_state_dict's per-tensor Python costs
        ~2 ms a step on the tiny model); the copy bumps version counters, so the packed decode weights follow
        (in a worker process, which cannot see the counters move, `_rollout_in_worker` marks them changed)."""
        if self.pairs is None:
            src = self.model.state_dict(keep_vars=True)
            dst = self.sampler.state_dict(keep_vars=True)
            if src.keys() != dst.keys():
                raise ValueError("GRPOConfig.async_rollouts: the sampler's tensors differ from the model's")
            self.pairs = ([dst[k] for k in dst], [src[k] for k in dst])
        torch._foreach_copy_(*self.pairs)

    def close(self, shutdown: bool = False) -> None:
        """Wait for a rollout in flight (the run ended or changed course) and drop it; shutdown: also end the
        background worker."""
        if self.pending is not None:
            self.pending[1].exception()  # waits; a dead worker's error is the future's, not raised here
            self.pending = None
        if shutdown:
            self.pool.shutdown(wait=True)


_WORKER: tuple | None = None  # (sample, sampler) in the forked rollout worker


def _rollout_worker_init(sample: Callable[[int], dict], sampler) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = (sample, sampler)


def _rollout_in_worker(step: int) -> bytes:
    """Step `step`'s groups, sampled in the worker and pickled with tensors by value (`_ByValue`)."""
    sample, sampler = _WORKER
    fast = sampler.__dict__.get("_fast_decoder")  # its packed weights: the trainer wrote new ones in shared memory
    if fast is not None:
        fast.weights_changed()
    buf = io.BytesIO()
    _ByValue(buf, protocol=5).dump(sample(step))
    return buf.getvalue()


class _ByValue(pickle.Pickler):
    """Tensors as their bytes. The executor's own pickler would move each tensor to shared memory and pass its
    file descriptor by a round trip to the worker: ~0.3 ms a tensor, ~40 ms for one step's groups on the
    head-to-head model, against ~3 ms to pickle and unpickle them this way."""

    def reducer_override(self, obj):
        if type(obj) is not torch.Tensor:
            return NotImplemented
        t = obj.detach().contiguous()
        return _tensor_from_bytes, (str(t.dtype).removeprefix("torch."), tuple(t.shape),
                                    t.reshape(-1).view(torch.uint8).numpy())


def _tensor_from_bytes(dtype: str, shape: tuple, data) -> torch.Tensor:
    return torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)


def n_mb_total(rows: torch.Tensor, cfg: GRPOConfig) -> int:
    return max(1, -(-len(rows) // cfg.minibatch_size))
