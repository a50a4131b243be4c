"""Pre-training: loss falls, resume is exact, MTP wiring, aux-loss-free balancing, bad config errors."""

import json
import shutil

import pytest
import torch

from nanoseek import DeepSeekModel, ModelConfig
from nanoseek.train.common import lr_at, read_metrics
from nanoseek.train.pretrain import PretrainConfig, lm_losses, pretrain, update_expert_bias

MICRO = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def micro_cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), embedded_docs=300, vocab_size=400, seq_len=64, batch_size=4, steps=12,
                warmup=2, lr=5e-3, eval_every=6, save_every=4, log_every=1, model_overrides=MICRO, tensorboard=False)
    base.update(kw)
    return PretrainConfig(**base)


def test_loss_falls_and_outputs_an_hf_folder(tmp_path):
    out = pretrain(micro_cfg(tmp_path, steps=30, eval_every=15, tensorboard=True))
    m = read_metrics(out.parent)
    first, last = m[0]["loss"], sum(r["loss"] for r in m[-3:]) / 3
    assert last < 0.7 * first
    assert "eval_loss" in m[-1] and "mtp_loss" in m[-1] and "load_max_min_ratio" in m[-1]
    # one main MoE layer, then the MTP module's (balanced too)
    assert len(m[-1]["expert_load"]) == 2 and all(abs(sum(l) - 1) < 1e-5 for l in m[-1]["expert_load"])
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert list((out.parent / "tb").glob("events.out.tfevents.*"))
    import nanoseek

    model = nanoseek.from_pretrained(out)
    assert model.config.num_nextn_predict_layers == 1


def test_resume_equals_uninterrupted_run(tmp_path):
    full = pretrain(micro_cfg(tmp_path / "a"))
    cfg = micro_cfg(tmp_path / "b", stop_after=5)
    pretrain(cfg)  # stops after step 5 (checkpointed at 4 and 5)
    assert not (tmp_path / "b" / "run" / "model").exists()
    resumed = pretrain(micro_cfg(tmp_path / "b"))
    a = read_metrics(full.parent)
    b = read_metrics(resumed.parent)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"], ra["step"]
    import nanoseek

    wa, wb = nanoseek.from_pretrained(full).state_dict(), nanoseek.from_pretrained(resumed).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_mtp_loss_reaches_mtp_module_with_its_weight():
    cfg = ModelConfig.from_preset("tiny", **MICRO, vocab_size=64, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = DeepSeekModel(cfg).train()
    tokens = torch.randint(0, 64, (2, 17))
    out = model(tokens[:, :-1])
    main, mtp = lm_losses(model, out, tokens, None)
    assert len(mtp) == 1
    # depth-1 target of position i is token i+2
    ref = torch.nn.functional.cross_entropy(out.mtp_logits[0].reshape(-1, 64), tokens[:, 2:].reshape(-1))
    assert torch.allclose(mtp[0], ref)
    mtp_layer = model.mtp_layers[0]
    for lam in (0.0, 0.3):
        model.zero_grad()
        out = model(tokens[:, :-1])
        main, mtp = lm_losses(model, out, tokens, None)
        (main + lam * mtp[0]).backward()
        g = mtp_layer.eh_proj.weight.grad
        if lam == 0:
            assert g is None or g.abs().sum() == 0
        else:
            g03 = g.clone()
    model.zero_grad()
    out = model(tokens[:, :-1])
    main, mtp = lm_losses(model, out, tokens, None)
    (main + 0.6 * mtp[0]).backward()
    assert torch.allclose(mtp_layer.eh_proj.weight.grad, 2 * g03, rtol=1e-4, atol=1e-7)  # weight scales the gradient


def test_document_boundaries_are_not_targets():
    cfg = ModelConfig.from_preset("tiny", **MICRO, vocab_size=64, num_nextn_predict_layers=0)
    model = DeepSeekModel(cfg)
    tokens = torch.randint(0, 64, (1, 9))
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    out = model(tokens[:, :-1])
    main, _ = lm_losses(model, out, tokens, doc)
    tgt = tokens[:, 1:].clone()
    tgt[0, 3] = -100  # position 3 (doc 0) would predict token 4 (doc 1)
    ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 64), tgt.reshape(-1), ignore_index=-100)
    assert torch.allclose(main, ref)


def test_bias_updates_reduce_load_imbalance_on_skewed_router():
    from nanoseek.model.moe import MoE

    cfg = ModelConfig.from_preset("tiny", **MICRO, vocab_size=64, n_routed_experts=8, n_group=1, topk_group=1,
                                  num_experts_per_tok=2)
    torch.manual_seed(0)
    moe = DeepSeekModel(cfg).model.layers[1].mlp
    assert isinstance(moe, MoE)
    common = torch.randn(cfg.hidden_size)
    x = torch.randn(4, 32, cfg.hidden_size) + 2 * common  # tokens share a direction...
    with torch.no_grad():
        moe.gate.weight[:2] += common / common.norm()  # ...that experts 0 and 1 are tuned to: a skewed router

    def imbalance():
        with torch.no_grad():
            _, r = moe(x)
        return float(r.load.max() / r.load.mean()), r.load

    before, load = imbalance()
    history = []
    for _ in range(300):
        update_expert_bias([moe.gate], [load], gamma=1e-2)
        imb, load = imbalance()
        history.append(imb)
    after = sum(history[-50:]) / 50  # sign updates oscillate around balance
    assert before > 2.5  # experts 0 and 1 take most tokens (4.0 = only them)
    assert after < 0.5 * before, (before, after)


def test_bias_update_moves_mtp_gate_against_its_own_load():
    """V3 sec. 2.1.2, for every MoE gate the model trains, the MTP module's included: b_i += gamma for an
    under-loaded expert, -= gamma for an over-loaded one, unchanged at the mean. Loads follow out.router, then
    out.mtp_router."""
    cfg = ModelConfig.from_preset("tiny", **MICRO, vocab_size=64, num_nextn_predict_layers=1)
    model = DeepSeekModel(cfg)
    main_gate, mtp_gate = model.model.layers[1].mlp.gate, model.mtp_layers[0].mlp.gate
    main_load = torch.tensor([2., 2., 2., 2., 2., 2., 2., 2.])  # balanced: no move
    mtp_load = torch.tensor([1., 3., 2., 2., 0., 4., 2., 2.])  # mean 2
    update_expert_bias(model, [main_load, mtp_load], gamma=0.01)
    assert torch.equal(main_gate.e_score_correction_bias, torch.zeros(8))
    assert torch.allclose(mtp_gate.e_score_correction_bias, 0.01 * torch.tensor([1., -1., 0., 0., 1., -1., 0., 0.]))
    update_expert_bias(model, [main_load], gamma=0.01)  # a forward without MTP: the MTP gate is left alone
    assert torch.allclose(mtp_gate.e_score_correction_bias, 0.01 * torch.tensor([1., -1., 0., 0., 1., -1., 0., 0.]))


def test_balance_loss_covers_the_mtp_moe_layer():
    """V3 eq. 17-20 summed over every MoE layer that ran, the MTP module's included, so its gate gets the
    sequence-wise gradient; without mtp the MTP module does not run and is not counted."""
    cfg = ModelConfig.from_preset("tiny", **MICRO, vocab_size=64, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = DeepSeekModel(cfg).train()
    x = torch.randint(0, 64, (2, 12))
    out = model(x, mtp=True)
    assert len(out.router) == 1 and len(out.mtp_router) == 1
    ref = out.router[0].balance_loss + out.mtp_router[0].balance_loss
    assert torch.allclose(out.balance_loss, ref)
    out.balance_loss.backward()
    assert model.mtp_layers[0].mlp.gate.weight.grad.abs().sum() > 0
    no_mtp = model(x, mtp=False)
    assert torch.allclose(no_mtp.balance_loss, no_mtp.router[0].balance_loss)


def test_pretraining_moves_the_mtp_gate_selection_bias(tmp_path):
    from nanoseek.checkpoint import load_pretrained

    out = pretrain(micro_cfg(tmp_path, steps=3, eval_every=3, save_every=3, bias_update_speed=1e-3))
    model = load_pretrained(out, dtype=torch.float32)
    assert model.config.topk_method == "noaux_tc" and model.config.num_nextn_predict_layers == 1
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    assert model.mtp_layers[0].mlp.gate.e_score_correction_bias.abs().sum() > 0  # stayed 0 before


def test_lr_schedules():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_at(50, 100, 1.0, 10, "wsd", 0.1, 0.2) == 1.0
    assert lr_at(90, 100, 1.0, 10, "wsd", 0.1, 0.2) == pytest.approx(0.55)


@pytest.mark.parametrize("field,value", [("steps", 0), ("warmup", 50), ("schedule", "linear"), ("data", ["/nope.txt"]),
                                         ("seq_len", 2), ("dtype", "fp16")])
def test_bad_config_fails_before_compute(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        micro_cfg(tmp_path, **{field: value})


def test_user_jsonl_data(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} says hello world {i * 7}"}) + "\n"
                            for i in range(400)))
    out = pretrain(micro_cfg(tmp_path, data=[str(path)], steps=4, eval_every=4))
    assert read_metrics(out.parent)[-1]["step"] == 4


def test_cli_pretrain_maps_flags_to_the_config(tmp_path, capsys):
    from nanoseek.cli import main

    rc = main(["pretrain", "--out-dir", str(tmp_path / "cli"), "--steps", "2", "--warmup", "0", "--seq-len", "32",
               "--batch-size", "2", "--embedded-docs", "100", "--vocab-size", "300", "--no-tensorboard",
               "--model-overrides", json.dumps(MICRO)])
    assert rc == 0 and "model written to" in capsys.readouterr().out
    assert read_metrics(tmp_path / "cli")[-1]["step"] == 2
    assert main(["pretrain", "--steps", "0"]) == 2  # a bad value is a named error, exit code 2


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_takes_the_same_steps(tmp_path, monkeypatch):
    """PretrainConfig.compile: the torch.compile'd model gives the eager run's losses (about a minute of compiling)."""
    real, compiled_models = torch.compile, []

    def spy(model, *a, **kw):  # the trainer must really hand its model to torch.compile
        compiled_models.append(model)
        return real(model, *a, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    losses = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        pretrain(PretrainConfig(out_dir=str(out), embedded_docs=200, vocab_size=300, seq_len=64, batch_size=2, steps=3,
                                warmup=1, lr=5e-3, eval_every=3, save_every=3, tensorboard=False,
                                model_overrides=MICRO, compile=compiled))
        losses[compiled] = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(compiled_models) == 1 and isinstance(compiled_models[0], DeepSeekModel)
    assert len(losses[True]) >= 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
