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
import importlib
import importlib.util
import json
import sys
import types
import typing
from pathlib import Path

# one line of help per config field; fields not listed get their type and default
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
    "resume": "continue from the latest checkpoint in out_dir",
    "stop_after": "checkpoint and stop at this step (run again to resume)",
    "time_limit_s": "wall-clock budget in seconds: the step that spends it is the last (checkpointed, published)",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "seed": "random seed",
    "ep": "expert-parallel ranks under torchrun (`torchrun --nproc_per_node N -m nanoseek <stage> --ep E`; E divides "
          "N); batch sizes stay global",
}


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


def _flags(cls, name: str) -> list[str]:
    """The option strings of field `name`: --the-name, plus its ALIASES (and underscore spellings) for cls."""
    flags = ["--" + name.replace("_", "-")]
    aliases = _aliases(cls)
    if not aliases:
        return flags
    for spelled in [name] + [a for a, target in aliases.items() if target == name]:
        flags += ["--" + spelled.replace("_", "-"), "--" + spelled]
    return list(dict.fromkeys(flags))


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


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple = ()) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, t = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag = _flags(cls, f.name)
        h = HELP.get(f.name, "")
        # a field without a default is a required flag: argparse names it in a usage error (exit code 2)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and kind == "scalar":
            parser.add_argument(*flag, dest=f.name, type=t, required=True, help=f"{h} (required)" if h else "required")
            continue
        h = f"{h} (default: {default!r})" if h else f"default: {default!r}"
        if kind == "list":  # repeatable: --reward a --reward b == --reward a b
            parser.add_argument(*flag, dest=f.name, nargs="*", action="extend", type=t, default=None, help=h)
        elif kind == "json":
            parser.add_argument(*flag, dest=f.name, type=json.loads, default=None, help=h + "; a JSON object")
        elif t is bool:
            parser.add_argument(*flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        else:
            parser.add_argument(*flag, dest=f.name, type=t, default=None, help=h)
    fields = {f.name for f in dataclasses.fields(cls)} - set(skip)
    for alias, target in _aliases(cls).items():
        if isinstance(target, tuple) and target[0] in fields:  # a flag that sets a value
            parser.add_argument("--" + alias.replace("_", "-"), dest=target[0], action="store_const", const=target[1],
                                help=f"same as --{target[0].replace('_', '-')} {target[1]}")


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
          if getattr(args, f.name, None) is not None}
    kw.update(extra)
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
    per_tok = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    mha = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    print(f"KV cache per token  {per_tok:,} values (expanded K/V would be {mha:,}: {mha / per_tok:.0f}x)")
    print("KV cache bytes/token " + "  ".join(f"{name} {per_tok * b:,}" for name, b in (("fp32", 4), ("bf16", 2),
                                                                                       ("fp8", 1))))
    # weight bytes: embeddings, heads, router and norms stay in the model dtype (bf16 here) in every quantised
    # format, as published checkpoints keep them; scales: fp32 per 128x128 block (fp8), per 128 channels (int)
    total_mtp = cfg.num_parameters(include_mtp=True)
    from .quant import quantizable_parameters

    lin = quantizable_parameters(cfg)
    rest = total_mtp - lin
    fmts = (("fp32", 4 * total_mtp), ("bf16", 2 * total_mtp), ("fp8", lin * (1 + 4 / 128 ** 2) + 2 * rest),
            ("int8", lin * (1 + 4 / 128) + 2 * rest), ("int4", lin * (0.5 + 4 / 128) + 2 * rest))
    print("weight bytes        " + "  ".join(f"{name} {b / 1e9:,.1f} GB" for name, b in fmts)
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
                 args.ablate_shared)
    if args.keep_experts is not None:
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
                   help="cpu: <= 15 min on a 2-core CPU (the default for a new folder); micro: seconds, a smoke test; "
                        "gpu: larger runs. A folder resumes with the preset it was started with (run.json); "
                        "naming another one is an error")
    s.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                   help="FP8 pre-training, compared against the same run without FP8 (default: off, or the folder's)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default: 0, or the folder's)")
    s.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("info", help="parameter counts and cache size of a preset or config.json")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--config", help="a config.json or model folder")
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
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--fp8", action="store_true", help="write FP8 e4m3 weights with 128x128 weight_scale_inv")
    s.add_argument("--dtype", default="keep", help="float32, bfloat16 or keep")
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
    s.set_defaults(fn=cmd_prune)

    s = sub.add_parser("plan", help="per-rank memory of a parallelism plan, simulated on a fake process group")
    s.add_argument("--preset", default="deepseek-v3", help="model preset (default: deepseek-v3, 671B)")
    s.add_argument("--config", help="a config.json or model folder instead of a preset")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
