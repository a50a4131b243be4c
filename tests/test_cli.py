"""The `nanoseek` command as a newcomer meets it: usage errors, defaults that follow `nanoseek run`, run folders
that remember their preset, missing optional packages named up front, progress in log files, fast start-up."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nanoseek import cli, pipeline

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------- 15
def test_self_refine_without_model_is_a_usage_error(capsys):
    code, _, err = run_cli(capsys, "self-refine")
    assert code == 2 and "--model" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- 16
def test_post_run_commands_default_to_what_nanoseek_run_writes():
    from nanoseek.train.distill import DistillConfig
    from nanoseek.train.evaluate import EvalConfig
    from nanoseek.train.rejection import RejectionConfig

    grpo_model = str(pipeline.stage_outputs(pipeline.RunConfig().out)["grpo"])
    assert grpo_model == str(Path("runs/nanoseek/grpo/model"))
    assert EvalConfig().model == RejectionConfig().model == DistillConfig().teacher == grpo_model
    assert EvalConfig().levels == pipeline.RUN_PRESETS["cpu"]["eval"]["levels"]  # what the report evaluates
    args = cli.build_parser("eval").parse_args(["eval"])
    assert cli.dataclass_from_args(EvalConfig, args).model == grpo_model


def test_docs_next_commands_name_the_run_folder():
    for doc in ("README.md", "docs/pipeline.md"):
        text = (ROOT / doc).read_text()
        assert "runs/grpo/model" not in text and "runs/nanoseek/grpo/model" in text, doc


# ---------------------------------------------------------------------------------------------- 17
@pytest.fixture
def fake_stages(monkeypatch):
    """pipeline.run with every stage replaced by one that writes its output instantly; returns the stages run."""
    ran = []

    def fake(stage, P, cfg, dirs, outputs, common, reporter):
        ran.append(stage)
        target = outputs[stage]
        if stage == "tokenizer":
            target.mkdir(parents=True, exist_ok=True)
            (target / "tokenizer.json").write_text("{}")
        elif stage == "pretrain":
            target.mkdir(parents=True, exist_ok=True)
            (target / "config.json").write_text("{}")
            (dirs["pretrain"] / "pretrain_config.json").write_text(json.dumps(P["pretrain"]))
        elif target.suffix:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("{}")
        else:
            target.mkdir(parents=True, exist_ok=True)
            (target / "config.json").write_text("{}")

    monkeypatch.setattr(pipeline, "_run_stage", fake)
    return ran


def test_run_refuses_a_folder_made_by_another_preset(tmp_path, fake_stages, capsys):
    import torch

    out, threads = tmp_path / "run", torch.get_num_threads()
    pipeline.run(pipeline.RunConfig(out=str(out), preset="micro"))
    assert fake_stages == pipeline.STAGES
    assert torch.get_num_threads() == threads  # the preset's 2 threads do not leak into the calling process
    fake_stages.clear()
    with pytest.raises(ValueError, match="micro"):
        pipeline.run(pipeline.RunConfig(out=str(out), preset="cpu"))
    assert fake_stages == []
    code, _, err = run_cli(capsys, "run", "--out", out, "--preset", "cpu")
    assert code == 2 and "'micro'" in err and "--preset micro" in err
    # the same preset, or none (the folder's), resumes; the report names the folder's preset
    pipeline.run(pipeline.RunConfig(out=str(out), preset="micro"))
    pipeline.run(pipeline.RunConfig(out=str(out), preset=None))
    assert fake_stages == ["report", "report"]
    assert json.loads((out / "run.json").read_text())["preset"] == "micro"


def test_run_recognises_the_preset_of_a_folder_without_run_json(tmp_path, fake_stages):
    out = tmp_path / "old"
    pipeline.run(pipeline.RunConfig(out=str(out), preset="micro"))
    (out / "run.json").unlink()  # a folder written before run.json existed
    with pytest.raises(ValueError, match="micro"):
        pipeline.run(pipeline.RunConfig(out=str(out), preset="cpu"))


# ---------------------------------------------------------------------------------------------- 21
@pytest.fixture
def missing(monkeypatch):
    """missing(*names): importlib.util.find_spec answers None for these top-level packages."""
    real = importlib.util.find_spec

    def set_missing(*names):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, **kw: None if name.split(".")[0] in names else real(name, *a, **kw))

    return set_missing


def test_run_without_matplotlib_stops_before_training(tmp_path, missing, capsys):
    missing("matplotlib")
    code, _, err = run_cli(capsys, "run", "--preset", "micro", "--out", tmp_path / "r")
    assert code == 2 and "matplotlib" in err and "pip install 'nanoseek[plot]'" in err
    assert not (tmp_path / "r").exists()


def test_serve_without_uvicorn_names_the_extra(tmp_path, missing, capsys):
    missing("uvicorn", "fastapi")
    code, _, err = run_cli(capsys, "serve", "--model", tmp_path)
    assert code == 2 and "uvicorn" in err and "pip install 'nanoseek[serve]'" in err and "Traceback" not in err


def test_user_task_file_without_math_verify_names_the_extra(tmp_path, missing, capsys):
    missing("math_verify")
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "1/2?", "answer": "0.5"}\n')
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path, "--jsonl", f)
    assert code == 2 and "math-verify" in err and "pip install 'nanoseek[rl]'" in err
    assert cli.requires("eval", cli.build_parser("eval").parse_args(["eval"])) == []  # built-in tasks: not needed


def test_license_file_and_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "MIT" and meta["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


# ---------------------------------------------------------------------------------------------- 22
class _Pipe(io.StringIO):
    def isatty(self):
        return False


def test_progress_in_a_log_file_is_plain_lines(monkeypatch):
    from nanoseek.train.common import TqdmProgress

    err = _Pipe()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("NANOSEEK_PROGRESS_INTERVAL", "0")
    p = TqdmProgress()
    p.start(4, "pretrain", initial=1)
    for _ in range(3):
        p.update(1, loss=1.25)
    p.close()
    text = err.getvalue()
    assert "\r" not in text and "resuming stage pretrain at step 1" in text
    lines = text.splitlines()
    assert any(line.startswith("pretrain: 4/4") and "loss=1.25" in line for line in lines), text


def test_distill_progress_is_labelled_distill(tmp_path, monkeypatch):
    from nanoseek.train import common as C
    from nanoseek.train import sft as sft_mod
    from nanoseek.train.distill import DistillConfig, distill

    class Record(C.Progress):
        def start(self, total, desc, initial=0):
            self.desc = desc

    def fake_sft(cfg, progress, **kw):
        progress.start(cfg.steps, "sft")
        return Path(cfg.out_dir) / "model"

    monkeypatch.setattr(sft_mod, "sft", fake_sft)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (teacher / name).write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": []}\n')
    prog = Record()
    distill(DistillConfig(teacher=str(teacher), out_dir=str(tmp_path / "out"), data=[str(data)], min_samples=1,
                          student_init=str(teacher), steps=2), prog)
    assert prog.desc == "distill"


# ---------------------------------------------------------------------------------------------- 23
def test_the_cli_starts_without_torch():
    code = ("import sys, contextlib, io\nimport nanoseek.cli\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        nanoseek.cli.main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'tokenizers', 'nanoseek.model') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_python_m_nanoseek_and_the_lazy_public_api():
    done = subprocess.run([sys.executable, "-m", "nanoseek", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0 and "self-refine" in done.stdout
    import nanoseek

    assert nanoseek.DeepSeekModel.__name__ == "DeepSeekModel" and "tiny" in nanoseek.PRESETS
    with pytest.raises(AttributeError):
        nanoseek.NoSuchThing  # noqa: B018


# ---------------------------------------------------------------------------------------------- 18
def _subcommands(parser) -> dict:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_of_every_subcommand_has_a_help_line():
    bare = []
    for name, sub in _subcommands(cli.build_parser()).items():
        shown = {a.dest for a in sub._actions if a.help != argparse.SUPPRESS}
        for a in sub._actions:
            if a.help == argparse.SUPPRESS:  # a hidden older spelling: of an option that is shown
                assert a.dest in shown, (name, a.option_strings)
                continue
            words = re.sub(r"\(?default: [^)]*\)?", "", a.help or "").strip(" ;,.")
            if not words or (a.help or "").count("default:") > 1:
                bare.append(f"{name} {'/'.join(a.option_strings) or a.dest}: {a.help!r}")
    assert not bare, "\n".join(bare)


@pytest.mark.parametrize("command, old, new", [
    ("pretrain", ["--out-dir", "o", "--init-from", "m"], ["--out", "o", "--model", "m"]),
    ("dsa", ["--out-dir", "o", "--init-from", "m"], ["--out", "o", "--model", "m"]),
    ("sft", ["--out_dir", "o", "--init-from", "m"], ["--out", "o", "--model", "m"]),
    ("grpo", ["--out-dir", "o", "--init_from", "m"], ["--out", "o", "--model", "m"]),
    ("distill", ["--out-dir", "o", "--teacher", "m"], ["--out", "o", "--model", "m"]),
    ("info", ["--config", "m"], ["--model", "m"]),
    ("plan", ["--config", "m"], ["--model", "m"]),
])
def test_old_spellings_are_hidden_aliases_of_one_name_per_idea(command, old, new):
    parser = cli.build_parser(command)
    assert vars(parser.parse_args([command, *old])) == vars(parser.parse_args([command, *new]))
    text = _subcommands(parser)[command].format_help()
    assert all(flag in text for flag in new[::2])
    assert not any(flag in text for flag in old[::2]), text


def _stage_config(stage: str, tmp_path):
    """A non-default config of `stage` and the <stage>_config.json text that stage writes for it."""
    from nanoseek.train import distill, dsa, grpo, pretrain, sft

    out, m = str(tmp_path / stage), tmp_path / "model"
    m.mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        (m / name).write_text("{}")
    m = str(m)
    if stage == "pretrain":
        cfg = pretrain.PretrainConfig(out_dir=out, steps=7, warmup=2, model_overrides={"num_hidden_layers": 2},
                                      embedded_levels=[1], tensorboard=False, time_limit_s=5.0)
        return cfg, pretrain._json(cfg)
    if stage == "sft":  # the pipeline hands records over in memory: the file holds a placeholder, not read back
        cfg = sft.SFTConfig(init_from=m, out_dir=out, steps=5, warmup=1, teacher=m, packing=True,
                            records=[{"messages": []}])
        return dataclasses.replace(cfg, records=None), sft._json(cfg)
    if stage == "grpo":
        cfg = grpo.GRPOConfig(init_from=m, out_dir=out, steps=3, levels=[1, 2], domain_beta={"arithmetic": 0.1},
                              reward_weights={"accuracy": 1.0}, eps_high=0.2)
        return cfg, json.dumps({**dataclasses.asdict(cfg), "speciale": False}, indent=2)
    cfg = (dsa.DSAConfig(init_from=m, out_dir=out, index_topk=8, sparse_steps=3, data=["a.txt"]) if stage == "dsa"
           else distill.DistillConfig(teacher=m, out_dir=out, steps=4, warmup=1, student_overrides={"hidden_size": 32}))
    return cfg, json.dumps(dataclasses.asdict(cfg), indent=2)


@pytest.mark.parametrize("stage", ["pretrain", "dsa", "sft", "grpo", "distill"])
def test_config_file_a_stage_wrote_is_read_back(stage, tmp_path):
    cfg, text = _stage_config(stage, tmp_path)
    path = tmp_path / f"{stage}_config.json"
    path.write_text(text)
    args = cli.build_parser(stage).parse_args([stage, "--config", str(path)])
    assert cli.dataclass_from_args(type(cfg), args) == cfg


def test_flags_given_override_the_config_file(tmp_path):
    from nanoseek.train.grpo import GRPOConfig
    from nanoseek.train.pretrain import PretrainConfig
    from nanoseek.train.selfverify import SelfRefineConfig

    f = tmp_path / "p.json"
    f.write_text(json.dumps({"steps": 7, "warmup": 2, "lr": 0.5, "tensorboard": False, "embedded_levels": [1, 2]}))
    args = cli.build_parser("pretrain").parse_args(["pretrain", "--config", str(f), "--steps", "9", "--tensorboard",
                                                    "--embedded-levels", "3"])
    cfg = cli.dataclass_from_args(PretrainConfig, args)
    assert (cfg.steps, cfg.warmup, cfg.lr, cfg.tensorboard, cfg.embedded_levels) == (9, 2, 0.5, True, [3])
    # TRL's names in a GRPO file; YAML as well as JSON
    y = tmp_path / "g.yaml"
    if importlib.util.find_spec("yaml") is None:
        y = tmp_path / "g.json"
    y.write_text('{"learning_rate": 0.0001, "max_completion_length": 32, "steps": 4}')  # JSON is YAML too
    cfg = cli.dataclass_from_args(GRPOConfig, cli.build_parser("grpo").parse_args(["grpo", "--config", str(y),
                                                                                   "--steps", "6"]))
    assert (cfg.lr, cfg.max_tokens, cfg.steps) == (0.0001, 32, 6)
    # a required field may come from the file
    f.write_text('{"model": "m", "rounds": 2}')
    args = cli.build_parser("self-refine").parse_args(["self-refine", "--config", str(f)])
    assert cli.dataclass_from_args(SelfRefineConfig, args).model == "m"


def test_unknown_field_in_config_file_names_the_file_and_the_field(tmp_path, capsys):
    f = tmp_path / "pretrain_config.json"
    f.write_text(json.dumps({"steps": 3, "stepz": 4}))
    code, _, err = run_cli(capsys, "pretrain", "--config", f, "--out", tmp_path / "out")
    assert code == 2 and str(f) in err and "'stepz'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_command_leaves_the_process_group_it_joined(tmp_path, monkeypatch):
    """A stage under torchrun joins a process group; the command must leave it before the interpreter exits (left to
    the exit path, a gloo rank that had written its model aborted with a non-zero status now and then)."""
    import torch.distributed as torch_dist

    def joins_a_group(args):
        torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    def failing_after_joining(args):
        joins_a_group(args)
        raise ValueError("bad input")

    for fn, rc in ((joins_a_group, 0), (failing_after_joining, 2)):
        (tmp_path / "store").unlink(missing_ok=True)
        monkeypatch.setattr(cli, "cmd_info", fn)
        assert cli.main(["info"]) == rc
        assert not torch_dist.is_initialized()
