import json

import pytest
import torch

from nanoseek import PRESETS, DeepSeekModel, ModelConfig


def test_published_sizes_from_the_config_alone():
    v3 = ModelConfig.from_preset("deepseek-v3")
    assert abs(v3.num_parameters() / 1e9 - 671) < 3
    assert abs(v3.num_parameters(active=True) / 1e9 - 37) < 1.5
    assert abs(v3.num_parameters(include_mtp=True) / 1e9 - 685) < 5  # the published checkpoint's size
    v32 = ModelConfig.from_preset("deepseek-v3.2")
    assert v32.num_parameters() > v3.num_parameters() and v32.model_type == "deepseek_v32"
    lite = ModelConfig.from_preset("deepseek-v2-lite")
    assert abs(lite.num_parameters() / 1e9 - 15.7) < 0.3


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_small_presets_count_what_they_allocate(name):
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = DeepSeekModel(cfg)
    allocated = sum(p.numel() for p in model.parameters())
    assert cfg.num_parameters(include_mtp=True) == allocated
    lo, hi = {"tiny": (1e6, 5e6), "small": (50e6, 100e6)}[name]
    assert lo <= cfg.num_parameters() <= hi


def test_every_preset_validates_and_round_trips(tmp_path):
    for name, cfg in PRESETS.items():
        cfg.save(tmp_path / name)
        back = ModelConfig.load(tmp_path / name)
        assert back == cfg, name


def test_reads_transformers_written_configs(tmp_path):
    import transformers

    for cls, mt in ((transformers.DeepseekV3Config, "deepseek_v3"), (transformers.DeepseekV32Config, "deepseek_v32")):
        hf = cls(hidden_size=64, num_hidden_layers=4, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                 "original_max_position_embeddings": 64, "rope_theta": 5e4, "beta_fast": 32, "beta_slow": 1,
                 "mscale": 1.0, "mscale_all_dim": 1.0})
        hf.save_pretrained(tmp_path / mt)
        cfg = ModelConfig.load(tmp_path / mt)
        assert cfg.model_type == mt and cfg.hidden_size == 64 and cfg.rope_theta == 5e4
        assert cfg.rope_scaling["factor"] == 4.0 and cfg.rope_type == "yarn"
        back = transformers.AutoConfig.from_pretrained(tmp_path / mt)  # and transformers reads ours
        cfg.save(tmp_path / (mt + "_ours"))
        ours = transformers.AutoConfig.from_pretrained(tmp_path / (mt + "_ours"))
        assert ours.model_type == back.model_type
        assert ours.rope_parameters["factor"] == 4.0 and ours.rope_parameters["rope_theta"] == 5e4


def test_reads_legacy_rope_scaling(tmp_path):
    d = ModelConfig.from_preset("deepseek-v3").to_hf_dict()
    del d["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = ModelConfig.load(tmp_path)
    assert cfg.rope_scaling["factor"] == 40 and cfg.rope_theta == 10000.0
    assert abs(cfg.yarn_mscale() ** 0.5 - 1.3686) < 1e-3  # 0.1 ln 40 + 1


@pytest.mark.parametrize("field,value", [
    ("n_group", 3), ("topk_group", 9), ("num_experts_per_tok", 0), ("qk_rope_head_dim", 7), ("scoring_func", "relu"),
    ("index_topk", 0), ("first_k_dense_replace", 99), ("hidden_size", -1),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_preset("tiny", **{field: value})


def test_bad_config_json_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.load(tmp_path)
    d = ModelConfig.from_preset("tiny").to_hf_dict()
    d["kv_lora_rank"] = 0
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="kv_lora_rank"):
        ModelConfig.load(tmp_path)
