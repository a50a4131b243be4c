"""Test helpers: tiny random configs, and building the transformers oracle with nanoseek's weights."""

from __future__ import annotations

import torch

from nanoseek import DeepSeekModel, ModelConfig
from nanoseek.checkpoint import to_hf_state_dict


def tiny_config(**overrides) -> ModelConfig:
    """A few-layer config with every feature on and routing sensitive to the weights (init 0.2)."""
    base = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=256, num_nextn_predict_layers=1,
        initializer_range=0.2, torch_dtype="float32", index_n_heads=8, index_head_dim=16,
    )
    base.update(overrides)
    return ModelConfig(**base)


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def random_model(cfg: ModelConfig, seed: int = 0) -> DeepSeekModel:
    """Random weights everywhere, including norms, biases and the selection bias (which init to constants)."""
    torch.manual_seed(seed)
    m = DeepSeekModel(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if not name.endswith("bias") else 0.3 * torch.randn_like(p))
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return m.eval()


def _is_mtp(key: str, cfg: ModelConfig) -> bool:
    """A tensor of an MTP module: model.layers.{i}. with i >= num_hidden_layers (every depth)."""
    parts = key.split(".")
    return key.startswith("model.layers.") and int(parts[2]) >= cfg.num_hidden_layers


def hf_model(model: DeepSeekModel):
    """transformers DeepseekV3ForCausalLM / DeepseekV32ForCausalLM holding exactly `model`'s weights."""
    import transformers

    cfg = model.config
    d = cfg.to_hf_dict()
    for k in ("architectures", "model_type", "rope_scaling", "quantization_config", "torch_dtype", "scoring_func",
              "topk_method", "moe_layer_freq", "num_nextn_predict_layers"):
        d.pop(k, None)
    if cfg.use_dsa:
        d.pop("rope_interleave", None)
        hf_cfg = transformers.DeepseekV32Config(**d)
    else:
        hf_cfg = transformers.DeepseekV3Config(**d, num_mtp_layers=0)
    hf_cfg._attn_implementation = "eager"
    cls = transformers.DeepseekV32ForCausalLM if cfg.use_dsa else transformers.DeepseekV3ForCausalLM
    torch.manual_seed(0)
    ref = cls(hf_cfg).float().eval()
    sd = {k: v for k, v in to_hf_state_dict(model).items()
          if not _is_mtp(k, cfg)}  # transformers has no MTP layer
    # transformers fuses experts in memory: gate_up_proj [E, 2I, D], down_proj [E, D, I], like nanoseek
    own = model.state_dict()
    fused = {k: v for k, v in own.items() if ".experts." in k
             and not _is_mtp(k, cfg)}
    sd = {k: v for k, v in sd.items() if ".experts." not in k}
    sd.update(fused)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    # n_shared_experts=0: transformers builds a zero-width shared MLP (output 0) where nanoseek builds none
    empty = {k for k, v in ref.state_dict().items() if v.numel() == 0}
    missing = [k for k in missing if "rotary" not in k and k not in empty]
    assert not missing and not unexpected, (missing, unexpected)
    return ref


def overfit_and_save(model, tok, seqs: list[tuple[list[int], list[int]]], steps: int, folder) -> str:
    """Fit `model` to (token ids, loss mask) pairs, full batch, AdamW lr 1e-2, `steps` steps; save it with the
    tokenizer to `folder` (written beside it, then renamed: a half-written folder is never seen)."""
    L = max(len(s) for s, _ in seqs)
    x = torch.full((len(seqs), L), tok.pad_id)
    mask = torch.zeros(len(seqs), L)
    for i, (s, m) in enumerate(seqs):
        x[i, :len(s)], mask[i, :len(m)] = torch.tensor(s), torch.tensor(m, dtype=torch.float)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        logits = model(x[:, :-1], mtp=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        loss = (loss * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tmp = folder.with_name(folder.name + ".tmp")
    model.eval().save_pretrained(str(tmp))
    tok.save(str(tmp))
    tmp.rename(folder)
    return str(folder)
