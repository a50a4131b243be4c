"""V3.2-Speciale (extended thinking): GRPO on reasoning tasks only, with the length penalty relaxed."""

import json

import pytest

from nanoseek.tasks import make_problems
from nanoseek.train.grpo import SPECIALE_BUDGET, SPECIALE_LENGTH_WEIGHT, GRPOConfig, grpo, speciale_config
from nanoseek.train.rewards import RewardConfig, combine_rewards


def test_speciale_relaxes_the_length_penalty_and_doubles_the_budget():
    base = GRPOConfig(tasks=["arithmetic", "countdown"], max_tokens=96, length_buffer=32,
                      reward_weights={"accuracy": 1.0, "format": 0.2, "length": 1.0}, speciale=True)
    sp = speciale_config(base)
    assert not sp.speciale and sp.tasks == base.tasks
    assert sp.max_tokens == 96 * SPECIALE_BUDGET and sp.length_max == 96 * SPECIALE_BUDGET
    assert sp.reward_weights == {"accuracy": 1.0, "format": 0.2, "length": SPECIALE_LENGTH_WEIGHT}
    assert base.reward_weights["length"] == 1.0  # the original config is untouched

    problem = make_problems("arithmetic", 1)[0]

    def total(cfg, n_tokens):  # a correct, well-formed answer of n_tokens tokens
        r = combine_rewards(cfg.reward_weights, config=RewardConfig(
            weights=cfg.reward_weights, max_len=cfg.length_max or cfg.max_tokens, length_buffer=cfg.length_buffer))
        return r(problem.prompt, f"work</think>The answer is {problem.answer}.", problem, n_tokens).total

    # a long answer that the V3.2 recipe punishes fully is not punished at all under Speciale ...
    assert total(base, 100) == pytest.approx(1.2 - 1.0) and total(sp, 100) == pytest.approx(1.2)
    # ... and an overlong one costs a quarter as much
    assert total(sp, 400) == pytest.approx(1.2 - SPECIALE_LENGTH_WEIGHT)


def test_speciale_refuses_non_reasoning_tasks():
    with pytest.raises(ValueError, match="reasoning tasks only.*verify_arithmetic"):
        speciale_config(GRPOConfig(tasks=["arithmetic", "verify_arithmetic"], speciale=True))


def test_speciale_run_records_its_effective_settings(micro_base, tmp_path):
    out = tmp_path / "sp"
    grpo(GRPOConfig(init_from=str(micro_base), out_dir=str(out), steps=1, prompts_per_step=2, num_generations=2,
                    max_tokens=8, length_buffer=4, eval_every=1, eval_problems=2, save_every=1, tensorboard=False, speciale=True,
                    reward_weights={"accuracy": 1.0, "length": 0.4}))
    saved = json.loads((out / "grpo_config.json").read_text())
    assert saved["speciale"] is True and saved["max_tokens"] == 16 and saved["length_max"] == 16
    assert saved["reward_weights"]["length"] == pytest.approx(0.1)
