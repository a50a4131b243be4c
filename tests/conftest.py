import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py helpers
torch.set_num_threads(1)  # tiny tensors: one thread avoids pool overhead and oversubscription


MICRO_MODEL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                   v_head_dim=16, index_n_heads=4, index_head_dim=16)


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory):
    """A micro DeepSeek-V3 base model pre-trained for a few seconds on the embedded corpus (HF folder + tokenizer)."""
    from nanoseek.train.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("micro_base")
    return pretrain(PretrainConfig(out_dir=str(out), embedded_docs=600, vocab_size=500, seq_len=128, batch_size=4,
                                   steps=40, warmup=4, lr=5e-3, eval_every=40, save_every=40, tensorboard=False,
                                   model_overrides=MICRO_MODEL))
