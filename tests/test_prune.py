"""Expert pruning and ablations (nanoseek.prune): identity at K = all, the most used experts kept, group settings
kept valid, the pruned folder loading in nanoseek and transformers, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek.model import load_model
from nanoseek.prune import (ablate, calibration_token_lists, densify, expert_loads, mean_combine_weights, moe_layers,
                            prune_experts)
from oracle import random_model, tiny_config


def _calib(cfg, n=6, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (T,), generator=g).tolist() for _ in range(n)]


def _logits(model, x):
    with torch.no_grad():
        out = model(x, mtp=model.config.num_nextn_predict_layers > 0)
    return out.logits, out.mtp_logits


def test_expert_loads_count_every_routed_token_slot():
    model = random_model(tiny_config(), seed=1)  # 2 MoE layers + 1 MTP layer, top-2 of 8
    loads = expert_loads(model, _calib(model.config, n=3, T=10))
    assert sorted(loads) == [i for i, _ in moe_layers(model)] == [1, 2, 3]
    assert loads[1].sum() == loads[2].sum() == 3 * 10 * 2
    assert loads[3].sum() == 3 * 9 * 2  # the MTP module predicts from position 1 on


def test_keeping_all_experts_gives_identical_logits():
    model = random_model(tiny_config(), seed=2)
    pruned, info = prune_experts(model, expert_loads(model, _calib(model.config)), keep=8)
    assert info["n_group"] == 4 and info["topk_group"] == 2
    x = torch.randint(0, model.config.vocab_size, (2, 15))
    (a, am), (b, bm) = _logits(model, x), _logits(pruned, x)
    assert torch.equal(a, b) and torch.equal(am[0], bm[0])


def test_pruning_keeps_the_most_used_experts_and_their_router_rows():
    model = random_model(tiny_config(n_group=2, topk_group=1), seed=3)
    loads = {i: torch.tensor([5., 9, 1, 7, 3, 2, 8, 0]) for i, _ in moe_layers(model)}
    pruned, info = prune_experts(model, loads, keep=4)
    # n_group 2 divides 4 with 2 per group: each group {0..3}, {4..7} keeps its 2 most used; groups stay valid
    assert info["kept"][1] == [1, 3, 4, 6] and info["group_limited"]
    assert (pruned.config.n_routed_experts, pruned.config.n_group, pruned.config.topk_group) == (4, 2, 1)
    old, new = model.model.layers[1].mlp, pruned.model.layers[1].mlp
    idx = torch.tensor([1, 3, 4, 6])
    assert torch.equal(new.gate.weight, old.gate.weight[idx])
    assert torch.equal(new.gate.e_score_correction_bias, old.gate.e_score_correction_bias[idx])
    assert torch.equal(new.experts.down_proj, old.experts.down_proj[idx])
    assert torch.equal(new.experts.gate_up_proj, old.experts.gate_up_proj[idx])


def test_pruning_that_breaks_the_groups_turns_group_limiting_off():
    model = random_model(tiny_config(), seed=4)  # n_group 4: keeping 4 leaves 1 per group, V3 scores groups by top-2
    loads = {i: torch.tensor([5., 9, 1, 7, 3, 2, 8, 0]) for i, _ in moe_layers(model)}
    pruned, info = prune_experts(model, loads, keep=4)
    assert info["kept"][2] == [0, 1, 3, 6] and not info["group_limited"]  # the global top 4
    assert (pruned.config.n_group, pruned.config.topk_group) == (1, 1)


@pytest.mark.parametrize("over,keep", [(dict(), 4), (dict(n_group=2, topk_group=1), 4), (dict(), 3)])
def test_pruned_checkpoint_loads_in_nanoseek_and_transformers(tmp_path, over, keep):
    model = random_model(tiny_config(num_nextn_predict_layers=0, **over), seed=5)
    pruned, _ = prune_experts(model, expert_loads(model, _calib(model.config)), keep=keep)
    cfg, x, logits = _saved_and_reloaded(pruned, tmp_path)
    assert cfg["n_routed_experts"] == keep
    assert not torch.equal(logits, model(x).logits)  # pruning changed the model


def _saved_and_reloaded(model, folder):
    """Save `model`; nanoseek's reload gives identical logits and transformers' DeepseekV3 within 1e-4.
    Returns (the written config, the input, the logits)."""
    import transformers

    model.save_pretrained(folder)
    ours = load_model(folder)
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 14))
    with torch.no_grad():
        a, b, c = model(x).logits, ours(x).logits, ref(x).logits
    assert torch.equal(a, b) and (a - c).abs().max() < 1e-4
    return json.loads((folder / "config.json").read_text()), x, a


@pytest.mark.parametrize("keep,match", [(9, "--keep-experts 9 is more than the model's n_routed_experts 8"),
                                        (1, "--keep-experts 1 is less than num_experts_per_tok 2")])
def test_bad_keep_experts_is_an_error_naming_the_value(keep, match):
    model = random_model(tiny_config(), seed=6)
    with pytest.raises(ValueError, match=match):
        prune_experts(model, {i: torch.ones(8) for i, _ in moe_layers(model)}, keep=keep)


def test_ablations_zero_exactly_the_named_contributions():
    model = random_model(tiny_config(num_nextn_predict_layers=0), seed=7)
    x = torch.randn(1, 5, model.config.hidden_size)
    moe = model.model.layers[1].mlp
    with torch.no_grad():
        shared = moe.shared_experts(x)
        full = moe(x)[0]
        ablate(model, routed_layers=[1])
        assert torch.equal(moe(x)[0], shared)  # routed experts add exactly 0
        assert not torch.equal(full, shared)
        ablate(model, shared_layers=[2])
        assert not model.model.layers[2].mlp.shared_experts.down_proj.weight.any()
    with pytest.raises(ValueError, match="layer 0 is not a MoE layer"):
        ablate(model, routed_layers=[0])


def test_calibration_jsonl_fields_and_errors(tmp_path):
    class CharTok:
        def encode(self, text):
            return [ord(c) % 50 for c in text]

    p = tmp_path / "calib.jsonl"
    p.write_text('{"text": "abc"}\n{"prompt": "1+1=", "answer": "2"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    seqs = calibration_token_lists(CharTok(), str(p), num_samples=10)
    assert [len(s) for s in seqs] == [3, 6, 2]
    p.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"calib.jsonl:1: .*'text', 'prompt' or 'messages'"):
        calibration_token_lists(CharTok(), str(p))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        calibration_token_lists(CharTok(), str(tmp_path / "nope.jsonl"))
    assert len(calibration_token_lists(CharTok(), "embedded", num_samples=4)) == 4


def _constant_routing(model):
    """Zero router weights and selection bias: every expert scores 0.5, so with top-E routing each gets scale/E."""
    with torch.no_grad():
        for _, moe in moe_layers(model):
            moe.gate.weight.zero_()
            moe.gate.e_score_correction_bias.zero_()
    return model


def test_densify_equals_the_moe_layers_under_constant_routing():
    cfg = tiny_config(num_experts_per_tok=8, n_group=1, topk_group=1, intermediate_size=9 * 32)
    model = _constant_routing(random_model(cfg, seed=8))
    weights = mean_combine_weights(model, _calib(cfg, n=3, T=20))
    assert all(torch.allclose(w, torch.full((8,), 2.5 / 8)) for w in weights.values())
    dense, info = densify(model, weights)  # keep = (288 - 32) / 32 = 8: every expert
    assert dense.config.n_routed_experts == 0 and not any(layer.is_moe for layer in dense.model.layers)
    assert info["kept"][1] == list(range(8))
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    (a, am), (b, bm) = _logits(model, x), _logits(dense, x)
    assert (a - b).abs().max() < 1e-4 and (am[0] - bm[0]).abs().max() < 1e-4


def test_densify_keeps_the_heaviest_experts_scaled_and_zero_padded():
    model = random_model(tiny_config(num_nextn_predict_layers=0, intermediate_size=128), seed=9)
    weights = {i: torch.tensor([.1, .6, .2, .5, 0., .3, .4, .2]) for i, _ in moe_layers(model)}
    dense, info = densify(model, weights, keep=2)  # 32 shared + 2 x 32 routed = 96 of 128: 32 zero rows
    assert info["kept"][1] == [1, 3]
    scale = torch.tensor([.6, .5]) * (2.3 / 1.1)  # the kept means carry the layer's total weight
    old, new = model.model.layers[1].mlp, dense.model.layers[1].mlp
    I = 32
    assert torch.equal(new.gate_proj.weight[:I], old.shared_experts.gate_proj.weight)
    assert torch.equal(new.up_proj.weight[I:2 * I], old.experts.gate_up_proj[1, I:])
    assert torch.allclose(new.down_proj.weight[:, 2 * I:3 * I], old.experts.down_proj[3] * scale[1])
    assert not new.gate_proj.weight[3 * I:].any() and not new.down_proj.weight[:, 3 * I:].any()
    with pytest.raises(ValueError, match="--keep-experts 4: a dense merge keeps 1 to 3 routed experts"):
        densify(model, weights, keep=4)


def test_densified_folder_loads_in_nanoseek_and_transformers(tmp_path):
    model = random_model(tiny_config(num_nextn_predict_layers=0), seed=10)
    dense, _ = densify(model, mean_combine_weights(model, _calib(model.config)))
    cfg, _, _ = _saved_and_reloaded(dense, tmp_path)
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] and cfg["n_routed_experts"] == 0
