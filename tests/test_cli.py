"""The `nanoseek` command as a newcomer meets it: usage errors, defaults that follow `nanoseek run`, run folders
that remember their preset, missing optional packages named up front, progress in log files, fast start-up."""

from __future__ import annotations

import importlib.util
import io
import json
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
    out = tmp_path / "run"
    pipeline.run(pipeline.RunConfig(out=str(out), preset="micro"))
    assert fake_stages == pipeline.STAGES
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

    def fake_sft(cfg, progress):
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
