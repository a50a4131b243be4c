"""The model against the transformers oracle, and its own invariants (absorbed == expanded, DSA, routing)."""

import pytest
import torch

from nanoseek import DeepSeekModel
from nanoseek.model.moe import Gate
from oracle import YARN, hf_model, random_model, tiny_config

YARN_MSCALE = {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}  # attention factor != 1 scales cos/sin

PARITY_CASES = {
    "moe_groups_bias": {},
    "q_lora_null": dict(q_lora_rank=None),
    "yarn": dict(rope_scaling=YARN),
    "yarn_mscale_ratio": dict(rope_scaling=YARN_MSCALE),
    "all_moe_no_norm_topk": dict(first_k_dense_replace=0, norm_topk_prob=False, n_group=2, topk_group=1),
    "dsa_topk_below_seq": dict(index_topk=5),
    "dsa_yarn": dict(index_topk=7, rope_scaling=YARN, n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=3),
    # edge values of the config (issue 11 item 1): each one a branch of routing or layer layout
    "one_expert_per_token_norm_topk": dict(num_experts_per_tok=1, norm_topk_prob=True),  # w = s/s * scale
    "one_expert_per_token_no_norm_topk": dict(num_experts_per_tok=1, norm_topk_prob=False),
    "one_group": dict(n_group=1, topk_group=1),
    "one_group_kept": dict(n_group=4, topk_group=1),
    "no_shared_expert": dict(n_shared_experts=0),
    "first_layer_moe": dict(first_k_dense_replace=0),
    "all_dense": dict(first_k_dense_replace=3),  # = num_hidden_layers: no routed layer in the main model
    "dsa_one_expert_per_token": dict(index_topk=5, num_experts_per_tok=1),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_match_transformers(case):
    cfg = tiny_config(**PARITY_CASES[case])
    model = random_model(cfg, seed=1)
    ref = hf_model(model)
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(x).logits, ref(x).logits
    assert ours.shape == (2, 24, cfg.vocab_size)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_null_shared_experts_in_config_json_means_none_and_matches_transformers_zero():
    """DeepSeek-V2's config.json writes n_shared_experts: null for "no shared expert"; transformers takes only
    an int (0 builds a zero-width shared MLP). nanoseek reads null as 0 and rejects other non-integers by name."""
    from nanoseek import ModelConfig

    d = tiny_config().to_hf_dict()
    d["n_shared_experts"] = None
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.n_shared_experts == 0
    model = random_model(cfg, seed=1)
    assert all(getattr(layer.mlp, "shared_experts", None) is None for layer in model.model.layers)
    ref = hf_model(model)
    x = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(x).logits - ref(x).logits).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="n_shared_experts"):
        tiny_config(n_shared_experts=None)


def test_padded_batch_matches_transformers_on_real_tokens():
    cfg = tiny_config()
    model = random_model(cfg, seed=3)
    ref = hf_model(model)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    am = torch.ones(2, 16, dtype=torch.long)
    am[1, :5] = 0  # left padding
    with torch.no_grad():
        ours = model(x, attention_mask=am).logits
        theirs = ref(x, attention_mask=am).logits
    assert (ours[0] - theirs[0]).abs().max() < 1e-4
    assert (ours[1, 5:] - theirs[1, 5:]).abs().max() < 1e-4
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("over", [{}, dict(q_lora_rank=None, rope_scaling=YARN), dict(index_topk=6)])
def test_absorbed_mode_equals_expanded(over):
    cfg = tiny_config(**over)
    model = random_model(cfg, seed=4)
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        a, b = model(x).logits, model(x, absorb=True).logits
    assert (a - b).abs().max() < 1e-4


def test_dsa_with_topk_at_least_context_equals_dense_attention():
    cfg = tiny_config(index_topk=32)
    model = random_model(cfg, seed=5)
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        sparse = model(x).logits
        dense = model(x, dsa_dense=True).logits
        small = DeepSeekModel(cfg.replace(index_topk=4))
        small.load_state_dict(model.state_dict())
        small.eval()
        sparse4 = small(x).logits
    assert (sparse - dense).abs().max() < 1e-5
    assert (sparse4 - dense).abs().max() > 1e-3  # a top-4 selection really drops keys


def test_indexer_loss_trains_only_the_indexer():
    cfg = tiny_config(index_topk=4)
    model = random_model(cfg, seed=6).train()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(x, dsa_dense=True, indexer_loss=True, mtp=False)
    assert out.indexer_loss is not None and out.indexer_loss.item() >= 0
    out.indexer_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".indexer." in n for n in grads)


def test_forced_routing_replays_choice_and_keeps_gate_gradient():
    cfg = tiny_config()
    model = random_model(cfg, seed=7)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        out = model(x)
        replay = model(x, forced_expert_ids=out.expert_ids)
    assert (out.logits - replay.logits).abs().max() == 0
    other = [(ids + 1) % cfg.n_routed_experts for ids in out.expert_ids]
    model.train()
    changed = model(x, forced_expert_ids=other, mtp=False)
    assert (changed.logits - out.logits).abs().max() > 1e-3
    assert all(torch.equal(r.expert_ids, o) for r, o in zip(changed.router, other))
    changed.logits.sum().backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_group_limited_routing_masks_with_minus_inf_under_negative_bias():
    cfg = tiny_config(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()
        gate.e_score_correction_bias.copy_(torch.tensor([-5., -5., -9., -9., -9., -9., -9., -9.]))
    scores = torch.full((3, 8), 0.5)
    ids = gate.select(scores)
    # group 0 wins; with a 0-mask the masked experts (0 > -4.5) would have been chosen instead
    assert sorted(ids[0].tolist()) == [0, 1]


def test_softmax_greedy_gate_matches_reference_formula():
    cfg = tiny_config(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                      routed_scaling_factor=1.0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(10, cfg.hidden_size)
    ids, w, scores = gate(x)
    s = torch.softmax(x @ gate.weight.T, dim=-1)
    ref_w, ref_ids = s.topk(cfg.num_experts_per_tok, dim=-1)
    assert gate.e_score_correction_bias is None
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    assert torch.allclose(w.sort(-1).values, ref_w.sort(-1).values, atol=1e-6)


def test_experts_match_per_token_loop_and_router_stats():
    cfg = tiny_config()
    model = random_model(cfg, seed=8)
    moe = model.model.layers[1].mlp
    x = torch.randn(2, 7, cfg.hidden_size)
    y, r = moe(x)
    flat = x.reshape(-1, cfg.hidden_size)
    ref = moe.shared_experts(flat).clone()
    I = cfg.moe_intermediate_size
    for t in range(flat.shape[0]):
        for k in range(cfg.num_experts_per_tok):
            e = r.expert_ids.reshape(-1, cfg.num_experts_per_tok)[t, k]
            gu = moe.experts.gate_up_proj[e] @ flat[t]
            h = torch.nn.functional.silu(gu[:I]) * gu[I:]
            ref[t] += r.weights.reshape(-1, cfg.num_experts_per_tok)[t, k] * (moe.experts.down_proj[e] @ h)
    assert (y.reshape(-1, cfg.hidden_size) - ref).abs().max() < 1e-4
    assert r.load.sum().item() == 14 * cfg.num_experts_per_tok
    # balance loss by hand: mean over sequences of sum_i f_i P_i
    E, K, T = cfg.n_routed_experts, cfg.num_experts_per_tok, 7
    total = 0.0
    for b in range(2):
        counts = torch.bincount(r.expert_ids[b].reshape(-1), minlength=E).float()
        P = (r.scores[b] / r.scores[b].sum(-1, keepdim=True)).mean(0)
        total += float((counts * E / (K * T) * P).sum().detach())
    assert abs(r.balance_loss.item() - total / 2) < 1e-5


def test_mtp_logits_align_and_receive_gradient():
    cfg = tiny_config(num_nextn_predict_layers=2)
    model = random_model(cfg, seed=9).train()
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    out = model(x)
    assert [t.shape for t in out.mtp_logits] == [(2, 9, cfg.vocab_size), (2, 8, cfg.vocab_size)]
    out.mtp_logits[1].sum().backward()
    mtp2 = model.model.layers[cfg.num_hidden_layers + 1]
    assert mtp2.eh_proj.weight.grad.abs().sum() > 0
    # MTP module k at position i sees token i+k: changing the last token changes depth-1 logits only at the end
    model.eval()
    with torch.no_grad():
        a = model(x, mtp=True).mtp_logits[0]
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % cfg.vocab_size
        b = model(y, mtp=True).mtp_logits[0]
    assert (a[:, :-1] - b[:, :-1]).abs().max() < 1e-5 and (a[:, -1] - b[:, -1]).abs().max() > 0


def test_bad_input_shape_is_named():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))


def test_masked_attention_is_sdpa_with_the_mask_forward_and_backward():
    """The eager product (one baddbmm with the mask as a -inf bias, softmax, bmm; v's head dim may differ) is
    scaled dot-product attention with a boolean mask, values and gradients (float64, SDPA's math path as the
    reference)."""
    import torch.nn.functional as F

    from nanoseek.model.mla import masked_attention

    g = torch.Generator().manual_seed(0)
    B, H, T, d, dv = 2, 3, 11, 8, 5
    mask = torch.rand(B, T, T, generator=g) < 0.6
    mask |= torch.eye(T, dtype=torch.bool)  # every query sees a key
    q, k, v = (torch.randn(B, H, T, n, generator=g, dtype=torch.float64, requires_grad=True) for n in (d, d, dv))
    go = torch.randn(B, H, T, dv, generator=g, dtype=torch.float64)
    got = masked_attention(q, k, v, mask, 0.3)
    grads = torch.autograd.grad(got, (q, k, v), go)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, torch.autograd.grad(want, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_explicit_masks_on_cpu_attend_through_the_eager_product_up_to_256_keys(monkeypatch):
    """A padded batch (an explicit mask) on CPU in fp32 attends through `masked_attention` in every layer, with the
    logits SDPA gives; past 256 keys, in bf16, or without a mask, SDPA's kernels run."""
    from nanoseek.model import mla

    q32 = torch.zeros(1, 1, 1, 4)
    assert mla.eager_masked_attention(q32, 256) and not mla.eager_masked_attention(q32, 257)
    assert not mla.eager_masked_attention(q32.bfloat16(), 8)
    model = random_model(tiny_config(), seed=4).eval()
    ids = torch.randint(2, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    pad = torch.ones(3, 9, dtype=torch.long)
    pad[0, 6:] = 0
    calls = []
    real = mla.masked_attention
    monkeypatch.setattr(mla, "masked_attention", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        eager = model(ids, attention_mask=pad).logits
        assert len(calls) == model.config.num_hidden_layers
        model(ids)  # plain causal: the fused kernel
        assert len(calls) == model.config.num_hidden_layers
        monkeypatch.setattr(mla, "eager_masked_attention", lambda q, S: False)
        sdpa = model(ids, attention_mask=pad).logits
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
