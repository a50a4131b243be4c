"""The main job's report leads with its result: SFT, GRPO and the student on the same held-out problems,
each with the number of problems and its standard error; the evaluation's standard error is the
binomial one for one sample per problem."""

import math

import pytest

from nanoseek.report import build_report
from nanoseek.train.evaluate import standard_error


def _eval(p: float, n: int = 1024) -> dict:
    se = math.sqrt(p * (1 - p) / n)
    return {"pass@1": p, "pass@1_se": se, "maj@1": p, "format_rate": 1.0, "mean_length": 70.0, "num_problems": n,
            "k": 1, "per_task": {"arithmetic/L2/en": {"pass@1": p, "maj@1": p, "pass@1_se": se, "num_problems": n}}}


def test_report_leads_with_the_three_numbers_and_their_errors(tmp_path):
    summary = {"preset": "cpu", "total_seconds": 840.0, "machine": "test", "eval_temperature": 0.0,
               "evals": {"base (pretrain)": _eval(0.0), "SFT": _eval(0.55), "GRPO": _eval(0.72),
                         "distilled student": _eval(0.61)}}
    md_path, _ = build_report(tmp_path, summary)
    text = md_path.read_text()
    head = text.split("## Model")[0].split("## Curves")[0]
    assert text.index("## Result") < text.index("## Held-out evaluation") < text.index("## Curves")
    assert "1024 test problems per row" in head and "arithmetic/L2/en" in head and "greedy" in head
    assert "| SFT (cold start) | 0.550 +- 0.016 |" in head
    assert "| GRPO | 0.720 +- 0.014 | +17.0 points over SFT |" in head
    assert "| distilled dense student | 0.610 +- 0.015 | 85% of the GRPO teacher |" in head
    table = text.split("## Held-out evaluation")[1]
    assert "| base (pretrain) | 1024 | 0.000 +- 0.000 |" in table and "L2 0.720" in table


def test_standard_error_is_binomial_for_one_sample_and_the_spread_for_k():
    scores = [1.0] * 300 + [0.0] * 700
    assert standard_error(scores) == pytest.approx(math.sqrt(0.3 * 0.7 / 1000))
    per_problem = [0.25, 0.75, 0.5, 1.0]  # pass@1 over k samples: the standard error of their mean
    m = sum(per_problem) / 4
    assert standard_error(per_problem) == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in per_problem) / 4 / 4))
    assert math.isnan(standard_error([]))
