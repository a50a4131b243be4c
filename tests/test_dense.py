"""The dense (Qwen2-layout) student: parity with transformers' Qwen2ForCausalLM, HF checkpoints both ways,
the KV cache against a full forward, named checkpoint errors, config helpers, the distillation loss."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import ModelConfig
from nanoseek.checkpoint import CheckpointError
from nanoseek.model.dense import DENSE_PRESETS, DenseConfig, DenseKVCache, DenseModel
from nanoseek.model.dense_checkpoint import load_dense
from nanoseek.train.distill_loss import logit_distillation_loss


def dense_config(**overrides) -> DenseConfig:
    base = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=500.0, max_position_embeddings=128, initializer_range=0.2,
                torch_dtype="float32", bos_token_id=0, eos_token_id=1)
    base.update(overrides)
    return DenseConfig(**base)


def random_dense(cfg: DenseConfig, seed: int = 0) -> DenseModel:
    """Random weights everywhere, including norms and the q/k/v biases (which init to constants)."""
    torch.manual_seed(seed)
    m = DenseModel(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(0.3 * torch.randn_like(p) if name.endswith("bias") else 1.0 + 0.3 * torch.randn_like(p))
    return m.eval()


def hf_qwen2(model: DenseModel):
    """transformers Qwen2ForCausalLM holding exactly `model`'s weights."""
    import transformers

    d = model.config.to_hf_dict()
    for k in ("architectures", "model_type", "torch_dtype", "rope_scaling"):
        d.pop(k)
    hf_cfg = transformers.Qwen2Config(**d)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(hf_cfg).float().eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    assert (ref.lm_head.weight is ref.model.embed_tokens.weight) == model.config.tie_word_embeddings
    return ref


def _ids(cfg, shape, seed=5):
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


PARITY = {
    "gqa_untied": dict(),
    "gqa_tied": dict(tie_word_embeddings=True),
    "mqa": dict(num_key_value_heads=1, rope_theta=1e6),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_logits_match_transformers_qwen2(case):
    cfg = dense_config(**PARITY[case])
    model = random_dense(cfg, seed=1)
    assert any(b.abs().min() > 0 for n, b in model.named_parameters() if n.endswith("k_proj.bias"))
    ref = hf_qwen2(model)
    x = _ids(cfg, (2, 24))
    with torch.no_grad():
        ours, theirs = model(x).logits, ref(x).logits
    assert ours.shape == (2, 24, cfg.vocab_size)
    assert theirs.abs().max() > 1.0  # logits far from zero: a mismatch would show
    assert (ours - theirs).abs().max().item() < 1e-4


def test_state_dict_keys_are_the_hf_keys():
    cfg = dense_config()
    model = DenseModel(cfg)
    assert set(model.state_dict()) == set(hf_qwen2(model).state_dict())
    assert "model.layers.2.self_attn.q_proj.bias" in model.state_dict()
    assert "model.layers.2.self_attn.o_proj.bias" not in model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    tied = DenseModel(dense_config(tie_word_embeddings=True))
    assert sum(p.numel() for p in tied.parameters()) == tied.config.num_parameters()


def test_forward_contract_matches_deepseek_model():
    cfg = dense_config()
    model = random_dense(cfg, seed=2)
    x = _ids(cfg, (2, 10))
    with torch.no_grad():
        full = model(x)
        other = model(x, absorb=True, forced_expert_ids=[], mtp=True, dsa_dense=True, indexer_loss=True,
                      logits_to_keep=3)
    assert full.hidden.shape == (2, 10, cfg.hidden_size)
    assert full.router == [] and full.mtp_logits == [] and full.balance_loss is None and full.indexer_loss is None
    assert other.logits.shape == (2, 3, cfg.vocab_size)
    assert torch.allclose(other.logits, full.logits[:, -3:], atol=1e-6)
    with pytest.raises(ValueError, match="positions are required"):
        model(x, cache=model.new_cache(2, 16))


@pytest.mark.parametrize("tied", [False, True])
def test_nanoseek_save_transformers_load(tmp_path, tied):
    import transformers

    model = random_dense(dense_config(tie_word_embeddings=tied), seed=3)
    model.save_pretrained(tmp_path)
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["model_type"] == "qwen2" and cfg_json["architectures"] == ["Qwen2ForCausalLM"]
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) == (not tied)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(ref).__name__ == "Qwen2ForCausalLM"
    x = _ids(model.config, (2, 20))
    with torch.no_grad():
        assert (model(x).logits - ref(x).logits).abs().max() < 1e-4


def test_sharded_save_loads_in_transformers_and_back(tmp_path):
    import transformers

    model = random_dense(dense_config(), seed=4)
    model.save_pretrained(tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))
    x = _ids(model.config, (1, 12))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    back = load_dense(tmp_path)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
        assert (ref(x).logits - model(x).logits).abs().max() < 1e-4
    model.save_pretrained(tmp_path)  # unsharded again: stale shards and index removed
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_save_load_dense(tmp_path, tied):
    model = random_dense(dense_config(tie_word_embeddings=tied), seed=5)
    ref = hf_qwen2(model)
    ref.save_pretrained(tmp_path)
    back = load_dense(tmp_path, dtype=torch.float32)
    assert back.config == model.config
    x = _ids(model.config, (2, 20))
    with torch.no_grad():
        assert (back(x).logits - ref(x).logits).abs().max() < 1e-4
    bf16 = load_dense(tmp_path, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16 and bf16.model.rotary.inv_freq.dtype == torch.float32


def test_padded_batch_matches_transformers_on_real_tokens():
    cfg = dense_config()
    model = random_dense(cfg, seed=6)
    ref = hf_qwen2(model)
    x = _ids(cfg, (3, 14))
    am = torch.ones(3, 14, dtype=torch.long)
    am[1, :5] = 0  # left padding
    am[2, :9] = 0
    with torch.no_grad():
        ours, theirs = model(x, attention_mask=am).logits, ref(x, attention_mask=am).logits
        alone = model(x[2:, 9:]).logits  # row 2 unpadded: RoPE is relative, so shifted positions agree
    real = am.bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-4
    assert (ours[2, 9:] - alone[0]).abs().max() < 1e-4
    assert (ours[0] - model(x[:1]).logits[0]).abs().max() < 1e-5  # an unpadded row is unaffected


def test_cached_decode_matches_full_forward():
    cfg = dense_config()
    model = random_dense(cfg, seed=7)
    x = _ids(cfg, (2, 16))
    lens = [9, 6]  # rows with different prompt lengths, prefilled separately, then decoded together
    with torch.no_grad():
        full = [model(x[b:b + 1]).logits[0] for b in range(2)]
        cache = model.new_cache(2, 20)
        assert isinstance(cache, DenseKVCache) and cache.k.dtype == torch.float32
        for b, n in enumerate(lens):
            view = cache.row_view(b)
            for a, e in ((0, n - 3), (n - 3, n)):  # chunked prefill
                out = model(x[b:b + 1, a:e], positions=torch.arange(a, e).unsqueeze(0), cache=view)
                assert (out.logits[0] - full[b][a:e]).abs().max() < 1e-4
        for step in range(5):
            pos = torch.tensor([[lens[0] + step], [lens[1] + step]])
            tok = torch.gather(x, 1, pos)
            out = model(tok, positions=pos, cache=cache)
            for b in range(2):
                assert (out.logits[b, 0] - full[b][pos[b, 0]]).abs().max() < 1e-4


def test_cache_copy_row_bytes_and_limits():
    cfg = dense_config()
    model = random_dense(cfg, seed=8)
    x = _ids(cfg, (1, 8))
    cache = model.new_cache(2, 8, dtype=torch.float64)
    assert cache.bytes_per_token() == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 8
    with torch.no_grad():
        model.double()
        model(x[:, :6], positions=torch.arange(6).unsqueeze(0), cache=cache.row_view(0))
        cache.copy_rows([0], [1], 6)  # prefix reuse: row 1 continues row 0's prompt
        out = model(x[:, 6:7].expand(2, 1), positions=torch.tensor([[6], [6]]), cache=cache)
        assert torch.allclose(out.logits[0], out.logits[1])
        assert torch.allclose(out.logits[0, 0], model(x[:, :7]).logits[0, 6], atol=1e-9)
        with pytest.raises(ValueError, match="beyond the cache length 8"):
            model(x[:, :1], positions=torch.tensor([[8]]), cache=cache.row_view(0))


def test_mismatched_checkpoint_error_names_every_tensor(tmp_path):
    model = random_dense(dense_config(), seed=9)
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.bias"]
    sd["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(7, 64)
    sd["model.layers.3.mlp.up_proj.weight"] = torch.zeros(96, 64)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old checkpoints: ignored
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_dense(tmp_path)
    msg = str(e.value)
    assert "model.layers.1.self_attn.k_proj.bias" in msg and "missing" in msg
    assert "model.layers.3.mlp.up_proj.weight" in msg and "unexpected" in msg
    assert "model.layers.0.mlp.gate_proj.weight: shape [7, 64]" in msg
    assert "inv_freq" not in msg
    loose = load_dense(tmp_path, strict=False)
    assert len(loose.load_problems) == 3 and torch.isfinite(loose(_ids(model.config, (1, 4))).logits).all()


def test_config_validation_roundtrip_and_students(tmp_path):
    with pytest.raises(ValueError, match="num_attention_heads"):
        dense_config(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_size"):
        dense_config(hidden_size=66)
    with pytest.raises(ValueError, match="torch_dtype"):
        dense_config(torch_dtype="int8")
    cfg = dense_config(tie_word_embeddings=True, eos_token_id=[1, 2])
    cfg.save(tmp_path)
    assert DenseConfig.load(tmp_path) == cfg
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        DenseConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**d, "use_sliding_window": True}))
    with pytest.raises(ValueError, match="use_sliding_window"):
        DenseConfig.load(tmp_path)

    teacher = ModelConfig.from_preset("tiny")
    student = DenseConfig.student_of(teacher)
    assert student.vocab_size == teacher.vocab_size and student.eos_token_id == teacher.eos_token_id
    assert 0.8e6 < student.num_parameters() < 1.3e6  # ~1M
    assert student == DENSE_PRESETS["student-tiny"]
    wide = DenseConfig.student_of(ModelConfig.from_preset("small"), hidden_size=256, num_hidden_layers=2)
    assert (wide.vocab_size, wide.hidden_size, wide.num_attention_heads, wide.num_key_value_heads) == (32768, 256, 8, 4)
    assert wide.num_hidden_layers == 2 and wide.intermediate_size == 768


def test_distillation_loss():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert logit_distillation_loss(t.clone(), t, mask).abs() < 1e-6
    assert logit_distillation_loss(t + 3.0, t, mask).abs() < 1e-5  # a constant shift is the same distribution
    s = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    loss = logit_distillation_loss(s, t, mask, temperature=2.0)
    assert loss > 0
    loss.backward()
    assert s.grad[0, 3:].abs().max() == 0 and s.grad[0, :3].abs().max() > 0  # masked tokens carry no gradient
    # the masked mean: per-token KL averaged over the 8 real tokens, times T^2
    p = (t / 2).softmax(-1)
    kl = (p * ((t / 2).log_softmax(-1) - (s.detach() / 2).log_softmax(-1))).sum(-1)
    assert torch.allclose(loss, kl[mask.bool()].mean() * 4, atol=1e-6)
    with pytest.raises(ValueError, match="vocab"):
        logit_distillation_loss(torch.randn(2, 5, 12), t, mask)
