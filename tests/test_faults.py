"""Training faults: a non-finite loss or gradient stops a stage with a named error and never reaches a checkpoint or
the published model; a resume survives a torn metrics line or a torn checkpoint file; bad data bytes are named."""

import json
import math
import warnings

import pytest
import torch

import nanoseek
from nanoseek.train import common as C
from nanoseek.train.common import NonFiniteError, latest_checkpoint, read_metrics
from nanoseek.train.pretrain import PretrainConfig, pretrain
from oracle import random_model, tiny_config

MICRO = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def micro_cfg(out, **kw):
    base = dict(out_dir=str(out), embedded_docs=300, vocab_size=400, seq_len=64, batch_size=4, steps=8, warmup=0,
                lr=5e-3, eval_every=100, save_every=1, log_every=1, keep_checkpoints=2, model_overrides=MICRO,
                tensorboard=False, device="cpu")
    base.update(kw)
    return PretrainConfig(**base)


def _all_finite(folder) -> bool:
    return all(torch.isfinite(t).all() for t in nanoseek.from_pretrained(folder).state_dict().values()
               if t.is_floating_point())


# ---------------------------------------------------------------------------------------------- non-finite


def test_pretrain_with_a_huge_lr_stops_named_keeps_the_last_finite_checkpoint_and_publishes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"pretrain: non-finite .*grad_norm=nan at step \d+") as e:
        pretrain(micro_cfg(out, lr=1000.0))
    assert e.value.stage == "pretrain" and e.value.step >= 2 and any("grad_norm" in w for w in e.value.what)
    assert not (out / "model").exists()  # never published
    last = latest_checkpoint(out / "checkpoints")
    assert last is not None and last.name == f"step_{e.value.step - 1:07d}" and str(last) in str(e.value)
    assert _all_finite(last)  # nothing non-finite was stepped into the weights that were saved
    steps = [r["step"] for r in read_metrics(out)]
    assert max(steps) < e.value.step  # the faulty step was not logged as a trained one
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out))


def test_cli_prints_the_fault_without_a_traceback_and_exits_non_zero(tmp_path, capsys):
    from nanoseek.cli import main

    rc = main(["pretrain", "--out-dir", str(tmp_path / "cli"), "--steps", "6", "--warmup", "0", "--lr", "1000",
               "--seq-len", "32", "--batch-size", "2", "--embedded-docs", "100", "--vocab-size", "300",
               "--save-every", "1", "--no-tensorboard", "--device", "cpu", "--model-overrides", json.dumps(MICRO)])
    err = capsys.readouterr().err
    assert rc != 0 and "non-finite" in err and "pretrain" in err and "Traceback" not in err
    assert not (tmp_path / "cli" / "model").exists()


def test_sft_with_a_huge_lr_stops_named(tmp_path):
    from nanoseek.data.corpus import embedded_sft_records
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train.sft import SFTConfig, sft

    base = tmp_path / "base"
    tok = train_tokenizer(["What is 2 + 3? The answer is 5."] * 30, vocab_size=300)
    model = random_model(tiny_config(vocab_size=320, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id), seed=3)
    model.save_pretrained(base)
    tok.save(str(base))
    records = embedded_sft_records(4, seed=1, langs=("en",), tasks=("arithmetic",), levels=(1,))
    out = tmp_path / "sft"
    with pytest.raises(NonFiniteError, match=r"sft: non-finite .* at step \d+") as e:
        sft(SFTConfig(out_dir=str(out), init_from=str(base), records=records, eval_fraction=0.0, steps=8, batch_size=2,
                      lr=1e6, warmup=0, schedule="constant", save_every=1, tensorboard=False, device="cpu"))
    assert e.value.stage == "sft" and not (out / "model").exists()
    last = latest_checkpoint(out / "checkpoints")
    assert last is None or _all_finite(last)


def test_check_finite_names_stage_step_and_every_bad_value():
    C.check_finite("grpo", 7, loss=1.5, grad_norm=torch.tensor(2.0), other=None)  # finite: silent
    with pytest.raises(NonFiniteError, match=r"dsa: non-finite loss=inf, grad_norm=nan at step 7") as e:
        C.check_finite("dsa", 7, loss=float("inf"), grad_norm=torch.tensor(float("nan")))
    assert isinstance(e.value, ValueError) and (e.value.stage, e.value.step) == ("dsa", 7)


def test_a_nan_model_is_never_checkpointed_nor_published(tmp_path):
    root = tmp_path / "stage" / "checkpoints"
    model = random_model(tiny_config(num_nextn_predict_layers=0), seed=4)
    good = C.save_stage_checkpoint(root, 1, model, state={"step": 1}, keep=1)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"stage: non-finite weights at step 2 \(model\.norm\.weight\)"):
        C.save_stage_checkpoint(root, 2, model, state={"step": 2}, keep=1)
    assert latest_checkpoint(root) == good and not (root / "step_0000002").exists()  # rotation kept the good one
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(NonFiniteError, match="model.norm.weight"):
        C.copy_model_folder(tmp_path / "bad", tmp_path / "stage" / "model")
    assert not (tmp_path / "stage" / "model").exists()
    assert C.copy_model_folder(good, tmp_path / "stage" / "model").is_dir()  # a finite one is published


# ---------------------------------------------------------------------------------------------- torn files


def _three_checkpoints(root):
    model = random_model(tiny_config(num_nextn_predict_layers=0), seed=5)
    for step in (1, 2, 3):
        C.save_stage_checkpoint(root, step, model, state={"step": step, "w": torch.randn(1000)}, keep=3)
    return root


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("torn", ["trainer_state.pt", "model.safetensors", "config.json"])
def test_latest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, torn):
    root = _three_checkpoints(tmp_path / "checkpoints")
    _truncate(root / "step_0000003" / torn)
    with pytest.warns(UserWarning, match=rf"step_0000003.*{torn.replace('.', '[.]')}.*previous intact one, step_0000002"):
        assert latest_checkpoint(root) == root / "step_0000002"
    _truncate(root / "step_0000002" / "trainer_state.pt", keep=0.1)
    with pytest.warns(UserWarning, match="step_0000001"):
        assert latest_checkpoint(root) == root / "step_0000001"
    _truncate(root / "step_0000001" / "model.safetensors", keep=0.9)
    with pytest.warns(UserWarning, match="no intact checkpoint"):
        assert latest_checkpoint(root) is None


def test_resume_survives_a_torn_metrics_line_and_a_torn_trainer_state(tmp_path):
    out = tmp_path / "run"
    pretrain(micro_cfg(out, steps=6, save_every=2, stop_after=4))  # checkpoints at steps 2 and 4
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1')  # killed mid-write
    _truncate(out / "checkpoints" / "step_0000004" / "trainer_state.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = pretrain(micro_cfg(out, steps=6, save_every=2))
    said = " | ".join(str(w.message) for w in caught)
    assert "metrics.jsonl:5: skipping a torn last line" in said and "previous intact one, step_0000002" in said
    assert final == out / "model" and _all_finite(final)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]  # resumed from step 2, no torn record


def test_metrics_reader_skips_only_a_torn_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:3: skipping a torn last line"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    p.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_metrics(p)
    p.write_bytes(b'{"step": 1}\n{"step": "\xff"}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        C.MetricsLogger(tmp_path, tensorboard=False, resume_step=3)


# ---------------------------------------------------------------------------------------------- data bytes


def test_non_utf8_data_names_the_file_and_line(tmp_path):
    from nanoseek.data import load_texts
    from nanoseek.data.loading import load_chat_jsonl
    from nanoseek.tasks.jsonl import load_jsonl_task

    txt = tmp_path / "a.txt"
    txt.write_bytes(b"line one\nline two\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"a\.txt:3: not UTF-8"):
        list(load_texts([str(txt)]))
    docs = tmp_path / "d.jsonl"
    docs.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8"):
        list(load_texts([str(docs)]))
    chat = tmp_path / "c.jsonl"
    chat.write_bytes(b'{"messages": [{"role": "user", "content": "\xc3("}]}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:1: not UTF-8"):
        load_chat_jsonl(chat)
    task = tmp_path / "t.jsonl"
    task.write_bytes(b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "\x80", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: not UTF-8"):
        load_jsonl_task(str(task))
