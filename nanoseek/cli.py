"""The `nanoseek` command. Each subcommand maps flags onto a stage's dataclass config and calls the
same function the pipeline calls; no logic lives here.

    nanoseek run                      # the whole recipe on embedded data, with a report
    nanoseek info --preset deepseek-v3
    nanoseek pretrain --out runs/base --steps 300
    nanoseek --help / nanoseek <command> --help
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path

# one line of help per config field: HELP["Class.field"], else the trailing comment of the field's line in its
# dataclass, else HELP["field"]; "(default: ...)" is appended unless the text already says what the default is
HELP = {
    "out_dir": "output folder (checkpoints, metrics.jsonl, tb/, and the final HF model folder `model/`)",
    "preset": "model preset: tiny, small, deepseek-v2-lite, deepseek-v3, deepseek-v3.2",
    "init_from": "HF model folder to start from",
    "data": "local data files (txt, jsonl, parquet); empty = the embedded corpus",
    "steps": "optimizer steps",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "schedule": "cosine | wsd | constant",
    "mtp_weight": "MTP loss weight lambda early in training (V3: 0.3)",
    "mtp_weight_late": "MTP loss weight late in training (V3: 0.1)",
    "bias_update_speed": "aux-loss-free balancing speed gamma (V3: 0.001); 0 disables it",
    "balance_alpha": "sequence-wise balance loss weight alpha (V3: 0.0001)",
    "fp8": "FP8 GEMMs (V3 recipe: 1x128 activation tiles, 128x128 weight blocks, E4M3)",
    "device": "cuda, mps or cpu (default: the best available)",
    "dtype": "auto (bf16 autocast on GPU, fp32 on CPU), float32 or bfloat16; in pretrain and sft a deprecated "
             "alias of --precision",
    "precision": "fp32, bf16 (bf16 weights, fp32 master weights and AdamW state), fp8 (V3 FP8 GEMMs) or amp "
                 "(bf16 autocast); auto: fp32 on CPU, amp on GPU. bf16 pays only on CPUs with bf16 matrix units",
    "resume": "continue from the latest checkpoint in the output folder",
    "stop_after": "checkpoint and stop at this step (run again to resume)",
    "time_limit_s": "wall-clock budget in seconds: the step that spends it is the last (checkpointed, published)",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "seed": "random seed",
    "ep": "expert-parallel ranks under torchrun (`torchrun --nproc_per_node N -m nanoseek <stage> --ep E`; E divides "
          "N); batch sizes stay global",
    # fields whose dataclass line has no comment
    "model_overrides": "ModelConfig fields to change from the preset, a JSON object: '{\"num_hidden_layers\": 4}'",
    "embedded_docs": "documents of the embedded corpus to train on (when no --data is given)",
    "embedded_records": "embedded cold-start chat records to train on (when no --data is given)",
    "embedded_levels": "embedded data: task difficulty levels",
    "embedded_langs": "embedded data: languages (en, zh)",
    "vocab_size": "vocabulary size of the tokenizer trained on the data (when no --tokenizer is given)",
    "seq_len": "tokens per training sequence",
    "eval_fraction": "share of the data held out for the eval loss",
    "min_lr_ratio": "the learning rate decays to this fraction of the peak",
    "warmup": "linear learning-rate warm-up steps",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the global gradient norm to this (TRL's max_grad_norm)",
    "eval_every": "evaluate every this many steps",
    "eval_batches": "micro-batches of held-out data per evaluation",
    "save_every": "checkpoint every this many steps",
    "log_every": "log metrics every this many steps",
    "compile": "run the model through torch.compile",
    "tensorboard": "also write TensorBoard event files to <out>/tb",
    "index_head_dim": "DSA indexer head dimension; None: the config's index_head_dim",
    "warmup_lr": "learning rate of the indexer warm-up stage",
    "sparse_lr": "learning rate of the sparse training stage",
    "indexer_loss_weight": "weight of the indexer's KL loss to the main attention's distribution",
    "prompt_format": "chat (the V3.1 template) or raw (the earlier turns' text as-is; --no-chat-template)",
    "packing": "pack several samples into each row of max_len tokens",
    "kd_temperature": "softmax temperature of the logit-distillation KL",
    "kd_weight": "logit distillation: loss = (1 - kd_weight) * CE + kd_weight * KD",
    "tasks": "built-in tasks (nanoseek/tasks): arithmetic, countdown, sorting, knights, multiplication (tools), ...",
    "levels": "task difficulty levels",
    "langs": "problem languages (en, zh)",
    "thinking": "prompt with the thinking template: the completion opens with reasoning (<think>)",
    "prompts_per_step": "problems per step; each gets num_generations completions",
    "max_tokens": "tokens to generate per completion at most",
    "temperature": "sampling temperature",
    "top_p": "nucleus sampling mass; 1 = off",
    "top_k": "sample among the k most likely tokens; 0 = off",
    "adam_beta1": "AdamW beta1",
    "adam_epsilon": "AdamW epsilon",
    "eps_low": "lower clip range epsilon of the importance ratio (TRL's epsilon)",
    "kl_kind": "KL estimator against the reference: k1, k2 or k3",
    "unbiased_kl": "V3.2's unbiased KL estimate (weighted by the importance ratio)",
    "keep_routing": "V3.2 keep routing: the training forward uses the experts the rollout chose",
    "keep_sampling_mask": "V3.2 keep sampling mask: the training forward masks the tokens top-p / top-k cut at rollout",
    "mask_truncated": "exclude completions cut at max_tokens from the loss (TRL's mask_truncated_completions)",
    "reward_weights": "reward name -> weight as a JSON object, or a JSON list aligned with --reward (TRL's form); "
                      "unset: accuracy 1.0 and format 0.2 (no format with bare answers), or only the user's rewards",
    "length_buffer": "length penalty: tokens before length_max over which the penalty ramps up (DAPO soft overlong)",
    "eval_problems": "held-out problems per evaluation",
    "eval_max_tokens": "tokens per held-out completion at most; None = max_tokens",
    "num_prompts": "problems to sample from",
    "samples_per_prompt": "teacher samples per problem",
    "student_from": "scratch: a fresh Qwen2-compatible student of --student-preset; teacher: the teacher with "
                    "each MoE layer merged into a dense SwiGLU (as `nanoseek prune --dense`)",
    "student_preset": "dense student preset (DenseConfig), sized from the teacher",
    "student_overrides": "DenseConfig fields to change from the student preset; a JSON object",
    "max_len": "tokens per training row; longer samples are truncated",
    "max_batch_size": "sequences decoded together",
    "num_transcripts": "sample transcripts kept in the results",
    "keep_per_prompt": "distinct verified completions kept per prompt at most",
    "rounds": "refinement rounds per problem",
    "n_verify": "verifier samples per solution",
    "meta_verify": "also score each verification with the meta-verifier",
    # per class, where the field's comment is not a description
    "EvalConfig.levels": "task difficulty levels (the default is the level `nanoseek run`'s report judges)",
    "RejectionConfig.out": "JSONL file to write the kept samples to (chat records, what `nanoseek sft --data` reads)",
    "SelfRefineConfig.model": "model folder (DeepSeek or dense student) with tokenizer files",
    "SFTConfig.epochs": "passes over the data (R1 fine-tunes for two), unless --steps is given",
    "SFTConfig.target_eval_loss": "end at the first evaluation (every --eval-every steps) whose held-out loss is at "
                                  "or below this; --steps / --epochs are then the most it trains",
    "PretrainConfig.bias_update_speed": "aux-loss-free balancing speed gamma (V3: 0.001); 0 disables it",
    "DSAConfig.index_n_heads": "DSA indexer heads; None: the model config's index_n_heads",
    "DSAConfig.warmup_steps": "stage 1 steps: the indexer alone learns, attention stays dense",
    "DSAConfig.sparse_steps": "stage 2 steps: everything trains, attention keeps the indexer's top-k keys",
    "GRPOConfig.num_generations": "completions sampled per problem (the group size G)",
    "GRPOConfig.adam_beta2": "AdamW beta2 (default: 0.95; TRL / transformers use 0.999)",
    "GRPOConfig.grad_clip": "clip the global gradient norm to this (TRL's max_grad_norm)",
    "DSAConfig.precision": "fp32, bf16 (bf16 weights, fp32 master weights and AdamW state, carried from the warm-up "
                           "into the sparse phase) or amp (default auto: fp32 on CPU, amp on GPU)",
    "GRPOConfig.precision": "fp32, bf16 (bf16 weights for rollouts and training, fp32 master weights and AdamW "
                            "state) or amp (default auto: fp32 on CPU, amp on GPU); no FP8 path in GRPO",
    "GRPOConfig.eval_every": "evaluate on held-out problems every this many steps; 0 = no evaluation",
    "EvalConfig.temperature": "sampling temperature (R1 evaluates at 0.6)",
    "EvalConfig.num_problems": "held-out problems per (task, level, language)",
    "SelfRefineConfig.num_problems": "held-out problems per (task, level, language)",
    "RejectionConfig.model": "model folder to sample from (default: runs/nanoseek/grpo/model, the RL model "
                             "`nanoseek run` writes)",
    "DistillConfig.teacher": "the teacher: a model folder whose verified samples the student learns from (default: "
                             "runs/nanoseek/grpo/model, the RL model `nanoseek run` writes)",
}

# One name per idea on the command line, whatever the field is called: the folder or file a command writes is --out,
# the model it starts from or reads is --model. field -> flag, or "Class.field" -> flag. The field's own spelling
# (--out-dir, --init-from, distill's --teacher) stays accepted as a hidden alias, so older commands keep working.
FLAG_NAMES = {"out_dir": "out", "init_from": "model", "DistillConfig.teacher": "model"}

# Fields a --config file may hold but that are not read from it: SFT's records are handed over in memory by the
# pipeline (a saved sft_config.json holds a placeholder); a saved grpo_config.json holds the effective V3.2-Speciale
# values already, so its "speciale" is not applied again (as GRPOConfig.from_dict reads it; give --speciale instead).
CONFIG_FILE_IGNORES = {"SFTConfig": ("records",), "GRPOConfig": ("speciale",)}


# Other names a config field answers to on the command line, per config class: TRL's GRPOConfig names where the idea
# is the same (docs/training.md has the table) and shorthands. alias -> field, or alias -> (field, value) for a
# flag that sets a value. Each alias and, for these classes, each field is also spelled with underscores
# (--max_completion_length, --num_generations), as TRL's command line spells them.
_RAW = ("prompt_format", "raw")
ALIASES = {
    "GRPOConfig": {
        "reward": "reward_funcs",  # --reward module:function[=weight], repeatable
        "no_chat_template": _RAW,
        # and TRL's names: nanoseek.train.grpo.TRL_NAMES, the one table (see _aliases)
    },
    "EvalConfig": {"no_chat_template": _RAW, "max_completion_length": "max_tokens", "model_name_or_path": "model"},
    "RejectionConfig": {"no_chat_template": _RAW, "max_completion_length": "max_tokens",
                        "model_name_or_path": "model"},
    "SFTConfig": {"no_chat_template": _RAW},
}


def _aliases(cls) -> dict:
    """ALIASES of cls plus the TRL names its module defines (TRL_NAMES, for GRPOConfig), or {}."""
    trl = getattr(sys.modules.get(cls.__module__), "TRL_NAMES", {})
    return {**trl, **ALIASES.get(cls.__name__, {})}


def _flags(cls, name: str) -> tuple[list[str], list[str]]:
    """The option strings of field `name` of cls: (shown, hidden). Shown: --its-flag (FLAG_NAMES, else the field's
    name), plus its ALIASES and, for classes with aliases, the underscore spellings. Hidden: the field's own
    spellings when FLAG_NAMES gives it another flag."""
    flag = FLAG_NAMES.get(f"{cls.__name__}.{name}", FLAG_NAMES.get(name, name))
    shown = ["--" + flag.replace("_", "-")]
    aliases = _aliases(cls)
    if aliases:
        for spelled in [flag] + [a for a, target in aliases.items() if target == name]:
            shown += ["--" + spelled.replace("_", "-"), "--" + spelled]
    hidden = ["--" + name.replace("_", "-"), "--" + name] if flag != name else []
    return list(dict.fromkeys(shown)), [h for h in dict.fromkeys(hidden) if h not in shown]


@functools.lru_cache(maxsize=None)
def _comments(cls) -> dict:
    """field -> the trailing comment on its line in cls's source ({} when the source cannot be read)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    found = (re.match(r"    (\w+): [^#]*#\s*(.+)$", line) for line in lines)
    return {m.group(1): m.group(2).strip() for m in found if m and m.group(1) in names}


def _help(cls, name: str) -> str:
    return HELP.get(f"{cls.__name__}.{name}") or _comments(cls).get(name) or HELP.get(name, "")


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    origin = typing.get_origin(t)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if origin in (list, typing.List) or (args and typing.get_origin(args[0]) is list):
        inner = typing.get_args(t if origin is list else args[0])
        return "list", (inner[0] if inner else str)
    if origin in (typing.Union, types.UnionType):
        t = args[0] if args else str
    if t is dict or typing.get_origin(t) is dict:
        return "json", None
    return "scalar", t


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple = ()) -> None:
    """A flag per field of cls (but `skip`), all defaulting to None (unset: the file's value, else the dataclass
    default), and --config FILE. Required fields are checked by dataclass_from_args: a --config file may set them."""
    parser.add_argument("--config", dest="config_file", metavar="FILE", default=None,
                        help="settings file: a JSON (or YAML) object of this command's config fields, e.g. the "
                             "<stage>_config.json a stage writes into its output folder; flags given override it")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, t = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown, hidden = _flags(cls, f.name)
        h = _help(cls, f.name)  # none: tests/test_cli.py names the field
        if kind == "json" and "JSON" not in h:
            h += "; a JSON object"
        if _required(f):
            h = f"{h} (required)".strip()
        elif "default" not in h:
            h = f"{h} (default: {default!r})".strip()
        if kind == "list":  # repeatable: --reward a --reward b == --reward a b
            kw = dict(nargs="*", action="extend", type=t)
        elif kind == "json":
            kw = dict(type=json.loads)
        elif t is bool:
            kw = dict(action=argparse.BooleanOptionalAction)
        else:
            kw = dict(type=t)
        if t is not bool:  # named after the flag, not the field: --model MODEL, not --model INIT_FROM
            kw["metavar"] = shown[0][2:].replace("-", "_").upper()
        parser.add_argument(*shown, dest=f.name, default=None, help=h, **kw)
        if hidden:  # an older spelling: still accepted, not shown
            parser.add_argument(*hidden, dest=f.name, default=None, help=argparse.SUPPRESS, **kw)
    fields = {f.name for f in dataclasses.fields(cls)} - set(skip)
    for alias, target in _aliases(cls).items():
        if isinstance(target, tuple) and target[0] in fields:  # a flag that sets a value
            parser.add_argument("--" + alias.replace("_", "-"), dest=target[0], action="store_const", const=target[1],
                                help=f"same as --{target[0].replace('_', '-')} {target[1]}")


def read_config_file(cls, path: str | Path) -> dict:
    """The fields a --config file sets: a JSON object (or YAML, for a .yaml / .yml file) of cls's field names (and
    their ALIASES / TRL names). An unknown name is a ValueError naming the file and the name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the file as JSON") \
                from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of {cls.__name__} fields, got {type(data).__name__}")
    own = {f.name for f in dataclasses.fields(cls)}
    names = {a: t for a, t in _aliases(cls).items() if isinstance(t, str)}
    unknown = [k for k in data if k not in own and k not in names]
    if unknown:
        raise ValueError(f"{path}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"(not in {cls.__name__}; `--help` lists the fields as flags)")
    out = {}
    for k, v in data.items():
        name = names.get(k, k) if k not in own else k
        if name in CONFIG_FILE_IGNORES.get(cls.__name__, ()):
            continue
        if name in out:
            raise ValueError(f"{path}: {k} and another name both set {name}")
        out[name] = v
    return out


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    """cls from the --config file (if any), then the flags given (they override the file), then `extra`."""
    kw = read_config_file(cls, args.config_file) if getattr(args, "config_file", None) else {}
    kw.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
               if getattr(args, f.name, None) is not None})
    kw.update(extra)
    missing = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in kw]
    if missing:
        raise ValueError(f"{_flags(cls, missing[0])[0][0]} is required (on the command line or in a --config file)")
    return cls(**kw)


def _progress():
    from .train.common import TqdmProgress

    return TqdmProgress()


# ---------------------------------------------------------------------------------------------- commands


def cmd_info(args) -> None:
    from .config import ModelConfig

    cfg = ModelConfig.load(args.config) if args.config else ModelConfig.from_preset(args.preset)
    total, active = cfg.num_parameters(), cfg.num_parameters(active=True)
    print(f"model_type          {cfg.model_type}")
    print(f"total parameters    {total:,} ({total / 1e9:.2f}B)")
    print(f"active per token    {active:,} ({active / 1e9:.2f}B)")
    print(f"with MTP modules    {cfg.num_parameters(include_mtp=True):,}")
    from .quant import kv_cache_bytes_per_token

    kv = kv_cache_bytes_per_token(cfg)
    per_tok = kv["fp8"]  # one byte a value: the value count
    mha = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    idx = f" + {cfg.index_head_dim} indexer key" if cfg.use_dsa else ""
    print(f"KV cache per token  {per_tok:,} values = {cfg.num_hidden_layers} layers x ({cfg.kv_lora_rank} latent + "
          f"{cfg.qk_rope_head_dim} rope key{idx}) (expanded K/V would be {mha:,}: {mha / per_tok:.0f}x)")
    print("KV cache bytes/token " + "  ".join(f"{name} {b:,}" for name, b in kv.items())
          + "  (fp8-deepseek: FlashMLA's layout, e4m3 + fp32 scale per 128, rope key bf16)")
    # weight bytes: embeddings, heads, router and norms stay in the model dtype (bf16 here) in every quantised
    # format, as published checkpoints keep them; scales: fp32 per 128x128 block (fp8), per 128 channels (int)
    total_mtp = cfg.num_parameters(include_mtp=True)
    from .quant import quantizable_parameters

    lin = quantizable_parameters(cfg)
    rest = total_mtp - lin
    fmts = (("fp32", 4 * total_mtp), ("bf16", 2 * total_mtp), ("fp8", lin * (1 + 4 / 128 ** 2) + 2 * rest),
            ("int8", lin * (1 + 4 / 128) + 2 * rest), ("int4", lin * (0.5 + 4 / 128) + 2 * rest))
    unit, div = ("GB", 1e9) if fmts[0][1] >= 1e9 else ("MB", 1e6)
    print("weight bytes        " + "  ".join(f"{name} {b / div:,.1f} {unit}" for name, b in fmts)
          + "  (with MTP; int8/int4 group 128)")


# the training stages: (command, help, module, config class, function, config fields not exposed as flags)
TRAIN_STAGES = [
    ("pretrain", "pre-train a DeepSeek-V3-style base model (MTP, aux-loss-free MoE, FP8)",
     "pretrain", "PretrainConfig", "pretrain", ()),
    ("dsa", "DSA continued training: indexer warm-up, then sparse training (V3.2)", "dsa", "DSAConfig", "dsa", ()),
    ("sft", "supervised fine-tuning on chat JSONL with the thinking template", "sft", "SFTConfig", "sft",
     ("records",)),
    ("grpo", "GRPO with verifiable rewards (R1 recipe, V3.2 options)", "grpo", "GRPOConfig", "grpo", ()),
    ("distill", "fine-tune a dense Qwen2-compatible student on the teacher's samples", "distill", "DistillConfig",
     "distill", ()),
]


def _stage_command(module: str, cls_name: str, fn_name: str):
    def run_stage(args) -> None:
        mod = importlib.import_module(f".train.{module}", __package__)
        out = getattr(mod, fn_name)(dataclass_from_args(getattr(mod, cls_name), args), _progress())
        print(f"model written to {out}")

    return run_stage


def cmd_eval(args) -> None:
    from .train.evaluate import EvalConfig, evaluate

    res = evaluate(dataclass_from_args(EvalConfig, args))
    k = res["k"]
    print(f"pass@1 {res['pass@1']:.3f}  maj@{k} {res[f'maj@{k}']:.3f}  format {res['format_rate']:.3f}  "
          f"mean length {res['mean_length']:.1f} tokens  ({res['num_problems']} problems)")
    for name, d in res["per_task"].items():
        print(f"  {name:28s} " + "  ".join(f"{m} {v:.3f}" for m, v in d.items()))
    if args.out:
        print(f"written to {args.out}")


class _CLIReporter:
    """One line per stage, a progress bar per stage, and the estimated time left."""

    def __init__(self):
        import time

        self.t0 = time.perf_counter()

    def stage_start(self, index: int, total: int, name: str, eta_s: float | None) -> None:
        import time

        left = f"; about {eta_s / 60:.1f} min left" if eta_s is not None else ""
        print(f"[{index}/{total}] {name} (elapsed {(time.perf_counter() - self.t0) / 60:.1f} min{left})", flush=True)

    def stage_end(self, name: str, seconds: float, skipped: bool) -> None:
        if skipped:
            print(f"      {name}: already done, skipped", flush=True)
        else:
            print(f"      {name}: done in {seconds:.0f} s", flush=True)

    def progress(self):
        from .train.common import TqdmProgress

        return TqdmProgress(leave=False)


def cmd_run(args) -> None:
    from .pipeline import RunConfig, run, stage_outputs

    cfg = RunConfig(out=args.out, preset=args.preset, fp8=args.fp8, threads=args.threads, seed=args.seed,
                    device=args.device)
    report = run(cfg, _CLIReporter())
    print(f"report: {report} and {report.with_suffix('.html')}")
    model = stage_outputs(args.out)["grpo"]
    print(f"next: nanoseek chat --model {model}\n      nanoseek eval --model {model}")


def cmd_rejection(args) -> None:
    from .train.rejection import RejectionConfig, rejection_sample

    path, stats = rejection_sample(dataclass_from_args(RejectionConfig, args))
    print(f"kept {stats['kept']} of {stats['samples']} samples ({stats['correct']} correct; dropped "
          f"{stats['dropped_overlong']} overlong, {stats['dropped_mixed_language']} mixed-language, "
          f"{stats['dropped_format']} malformed); written to {path}")


def cmd_self_refine(args) -> None:
    from .train.selfverify import SelfRefineConfig, run_self_refine

    cfg = dataclass_from_args(SelfRefineConfig, args)
    res = run_self_refine(cfg, progress=_progress())
    s = res["summary"]
    print(f"{s['problems']} problems; verifier agrees with the rule check on {s['verifier_agreement']:.3f} of solutions")
    print("round  accuracy (best-scored)  accuracy (latest)  mean score")
    for k, (b, l, m) in enumerate(zip(s["accuracy_best_by_round"], s["accuracy_latest_by_round"],
                                      s["mean_score_by_round"])):
        print(f"{k:5d}  {b:22.3f}  {l:17.3f}  {m:10.3f}")
    if cfg.out:
        print(f"written to {cfg.out}")


def cmd_convert(args) -> None:
    import torch

    from .checkpoint import load_pretrained

    model = load_pretrained(args.src, dtype=torch.float32)
    max_shard_bytes = int(args.shard_gb * 1024 ** 3)
    if args.quantize is not None:
        from .quant import quantize, save_quantized

        if args.fp8 or args.dtype != "keep":
            raise ValueError("--quantize sets the weight format: leave out --fp8 and --dtype with it")
        quantize(model, args.quantize)
        save_quantized(model, args.dst, max_shard_bytes=max_shard_bytes)
    else:
        dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
        model.save_pretrained(args.dst, fp8=args.fp8, dtype=dtype, max_shard_bytes=max_shard_bytes)
    tok = Path(args.src) / "tokenizer.json"
    if tok.exists():
        import shutil

        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (Path(args.src) / name).exists():
                shutil.copy(Path(args.src) / name, Path(args.dst) / name)
    print(f"wrote {args.dst}")


def cmd_prune(args) -> None:
    from .prune import prune

    info = prune(args.model, args.out, args.keep_experts, args.calib, args.num_samples, args.ablate_routed,
                 args.ablate_shared, dense=args.dense)
    if args.dense:
        print(f"merged every MoE layer into a dense SwiGLU (shared expert + the routed experts of largest mean "
              f"combine weight over {info['calibration_sequences']} calibration sequences):")
        for layer, ids in info["kept"].items():
            print(f"  layer {layer}: experts {ids}, scaled {info['scale'][layer]}")
    elif args.keep_experts is not None:
        groups = (f"group-limited routing kept (n_group {info['n_group']}, topk_group {info['topk_group']})"
                  if info["group_limited"] else "group-limited routing off (n_group = topk_group = 1)")
        print(f"kept {info['n_routed_experts']} of {info['n_routed_experts_before']} routed experts per MoE layer "
              f"(router load over {info['calibration_tokens']:,} calibration tokens); {groups}")
        for layer, ids in info["kept"].items():
            print(f"  layer {layer}: experts {ids}")
    print(f"wrote {args.out}")


def cmd_plan(args) -> None:
    from .config import ModelConfig
    from .parallel.plan import STANDARD_PLANS, format_table, simulate

    cfg = ModelConfig.load(args.config) if args.config else ModelConfig.from_preset(args.preset)
    if args.dp is None:
        plans = STANDARD_PLANS
    else:
        plans = [dict(name=f"dp {args.dp} x pp {args.pp}, EP {args.ep}", world=args.dp * args.pp, pp=args.pp,
                      ep=args.ep)]
    reports = [simulate(cfg, micro_batch=args.micro_batch, seq_len=args.seq_len, **p) for p in plans]
    print(format_table(reports))
    print(f"\nper rank, GB (1e9 bytes); {cfg.num_parameters(include_mtp=True) / 1e9:.1f}B parameters with MTP; "
          "simulated with torch's fake process group (docs/training.md, Scaling out)")


# ---------------------------------------------------------------------------------------------- requirements

# optional packages: (import name, what needs it, the extra that installs it)
_OPTIONAL = {"matplotlib": ("matplotlib", "the report's plots", "plot"),
             "uvicorn": ("uvicorn", "the server", "serve"), "fastapi": ("fastapi", "the server", "serve"),
             "math_verify": ("math-verify", "checking the answers of a --jsonl task file (1/2 = 0.5)", "rl"),
             "pyarrow": ("pyarrow", "reading .parquet data", "parquet")}


def requires(command: str, args: argparse.Namespace) -> list[str]:
    """The optional packages (import names) that `command` with these args needs and that are not installed."""
    need = []
    if command == "run":
        need.append("matplotlib")  # the report, after every stage has trained
    if command == "serve":
        need += ["fastapi", "uvicorn"]
    if getattr(args, "jsonl", None):  # user tasks are checked with math-verify (eval, rejection-sample, grpo, distill)
        need.append("math_verify")
    data = getattr(args, "data", None) or []
    if any(str(d).endswith(".parquet") for d in (data if isinstance(data, list) else [data])):
        need.append("pyarrow")
    return [name for name in need if importlib.util.find_spec(name) is None]


def _missing_message(command: str, missing: list[str]) -> str:
    names = ", ".join(_OPTIONAL[m][0] for m in missing)
    uses = " and ".join(dict.fromkeys(_OPTIONAL[m][1] for m in missing))
    extras = ",".join(sorted({_OPTIONAL[m][2] for m in missing}))
    return (f"nanoseek {command}: error: {names} {'is' if len(missing) == 1 else 'are'} not installed (needed for "
            f"{uses}); install with:\n    pip install 'nanoseek[{extras}]'")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `nanoseek` parser. command: only that subcommand gets its options, so the modules of the others
    (torch with them) are not imported: `main` passes the command it was given, "" for none (`--help`).
    None builds every subcommand's options."""

    def wanted(name: str) -> bool:
        return command is None or command == name

    p = argparse.ArgumentParser(prog="nanoseek", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    from .pipeline import RUN_PRESETS

    s = sub.add_parser("run", help="the whole recipe end to end on embedded data, with a report (the main job)")
    s.add_argument("--out", default="runs/nanoseek", help="run folder (default: runs/nanoseek); rerun to resume")
    s.add_argument("--preset", default=None, choices=sorted(RUN_PRESETS),
                   help="cpu: ~12 min on a 2-core AVX-512 CPU, ~30 on an AVX2 one (the default for a new folder); "
                        "micro: seconds, a smoke test; gpu: larger runs. A folder resumes with the preset it was started "
                        "with (run.json); naming another one is an error")
    s.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                   help="FP8 pre-training, compared against the same run without FP8 (default: off, or the folder's)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default: 0, or the folder's)")
    s.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("info", help="parameter counts and cache size of a preset or config.json")
    s.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    s.add_argument("--model", dest="config", default=None,
                   help="a model folder or its config.json, instead of --preset")
    s.add_argument("--config", dest="config", default=None, help=argparse.SUPPRESS)  # the older spelling
    s.set_defaults(fn=cmd_info)

    def config_class(module: str, cls_name: str):
        return getattr(importlib.import_module(f".train.{module}", __package__), cls_name)

    for name, help_, module, cls_name, fn_name, skip in TRAIN_STAGES:
        s = sub.add_parser(name, help=help_)
        if wanted(name):
            add_dataclass_args(s, config_class(module, cls_name), skip=skip)
        s.set_defaults(fn=_stage_command(module, cls_name, fn_name))

    s = sub.add_parser("eval", help="held-out evaluation: pass@1 over k samples, maj@k, format rate, length")
    if wanted("eval"):
        add_dataclass_args(s, config_class("evaluate", "EvalConfig"))
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("rejection-sample", help="sample k per prompt, keep verified and clean samples as SFT JSONL")
    if wanted("rejection-sample"):
        add_dataclass_args(s, config_class("rejection", "RejectionConfig"))
    s.set_defaults(fn=cmd_rejection)

    s = sub.add_parser("self-refine", help="generate, self-verify and refine on held-out problems (DeepSeekMath-V2)")
    if wanted("self-refine"):
        add_dataclass_args(s, config_class("selfverify", "SelfRefineConfig"))
    s.set_defaults(fn=cmd_self_refine)

    s = sub.add_parser("convert", help="re-save a checkpoint: FP8 block-quantised, bf16, or resharded")
    s.add_argument("src", help="model folder to read")
    s.add_argument("dst", help="folder to write the re-saved model to")
    s.add_argument("--fp8", action="store_true", help="write FP8 e4m3 weights with 128x128 weight_scale_inv")
    s.add_argument("--dtype", default="keep", help="float32, bfloat16 or keep (default: keep)")
    s.add_argument("--shard-gb", type=float, default=5.0, help="maximum shard size in GiB")
    s.add_argument("--quantize", default=None, choices=["fp32", "bf16", "int8", "int8-g128", "int4-g128", "fp8"],
                   help="weight-only format to write (nanoseek.quant): bf16 and fp8 folders load in transformers, "
                        "int8/int4 folders in nanoseek")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("prune", help="drop the least-used routed experts per MoE layer (router load on a calibration set)")
    s.add_argument("--model", required=True, help="a DeepSeek model folder")
    s.add_argument("--out", required=True, help="folder to write the pruned model to")
    s.add_argument("--keep-experts", type=int, default=None,
                   help="routed experts to keep per MoE layer (default: all, e.g. for ablations alone)")
    s.add_argument("--calib", default="embedded",
                   help="calibration set: 'embedded' (the embedded tasks' worked problems) or a JSONL of text, "
                        "prompt[+completion|solution|answer] or messages lines")
    s.add_argument("--num-samples", type=int, default=128, help="calibration sequences (default: 128)")
    s.add_argument("--ablate-routed", type=int, nargs="+", default=[], metavar="LAYER",
                   help="zero these MoE layers' routed experts (their output becomes exactly 0)")
    s.add_argument("--ablate-shared", type=int, nargs="+", default=[], metavar="LAYER",
                   help="zero these MoE layers' shared expert")
    s.add_argument("--dense", action="store_true",
                   help="merge each MoE layer into a dense SwiGLU of intermediate_size: the shared expert and the "
                        "--keep-experts routed experts of largest mean combine weight (default: as many as fit)")
    s.set_defaults(fn=cmd_prune)

    s = sub.add_parser("plan", help="per-rank memory of a parallelism plan, simulated on a fake process group")
    s.add_argument("--preset", default="deepseek-v3", help="model preset (default: deepseek-v3, 671B)")
    s.add_argument("--model", dest="config", default=None,
                   help="a model folder or its config.json, instead of --preset")
    s.add_argument("--config", dest="config", default=None, help=argparse.SUPPRESS)  # the older spelling
    s.add_argument("--dp", type=int, default=None,
                   help="data-parallel ranks per pipeline stage (EP borrows from them); default: the standard plans "
                        "(DeepSeek's 2048 H800s, 64 and 256 H100s)")
    s.add_argument("--ep", type=int, default=1, help="expert-parallel group size (must divide --dp)")
    s.add_argument("--pp", type=int, default=1, help="pipeline stages (simulated split, no schedule)")
    s.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (activation estimate)")
    s.add_argument("--seq-len", type=int, default=4096, help="sequence length (activation estimate)")
    s.set_defaults(fn=cmd_plan)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


from .serve.commands import register as _register_serve_commands  # noqa: E402  (stdlib-only import)

_EXTRA_COMMANDS: list = [_register_serve_commands]  # generate, chat, serve


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    parser = build_parser(command)
    args = parser.parse_args(argv)
    missing = requires(args.command, args)
    if missing:  # before anything runs, not after 12 minutes of training
        print(_missing_message(args.command, missing), file=sys.stderr)
        return 2
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nnanoseek {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """A stage run under torchrun joined a process group; leave it before the interpreter exits, as torch asks.
    Left to interpreter exit, a gloo rank that had written its model once aborted in CI ("terminate called without
    an active exception", a non-zero status for a finished run)."""
    if "torch.distributed" in sys.modules:  # not imported: no group to leave (and no torch import for fast commands)
        from .parallel import destroy

        destroy()


if __name__ == "__main__":
    sys.exit(main())
