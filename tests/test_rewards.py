"""Rule-based rewards: extraction, accuracy, format, language consistency, length, combining."""

import json
import time

import pytest

from nanoseek.data.corpus import embedded_sft_records
from nanoseek.tasks import Problem, load_jsonl_task, make_problems
from nanoseek.train.rewards import (RewardConfig, accuracy_reward, combine_rewards, extract_answer, find_answers,
                                    format_reward, language_consistency, language_consistency_reward, length_penalty)

ADD = Problem("arithmetic", 1, "en", "What is 40 + 2?", "42", {"nums": [40, 2], "ops": ["+"]})
GOOD = "ones: 0 + 2 = 2\ntens: 4\nso 40 + 2 = 42</think>The answer is 42."


@pytest.mark.parametrize("text,want", [
    ("The answer is 42.", "42"), ("答案是 42。", "42"), ("<answer>42</answer>", "42"), ("so \\boxed{42}", "42"),
    ("The answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"), ("Final answer: 7", "7"), ("答案：A：骑士，B：骗子。", "A：骑士，B：骗子"),
    ("The answer is 0.5.", "0.5"), ("The answer is 3. Then 5 was a typo", "3"), ("the answer is **-8**", "-8"),
    ("The answer is 1, 2, 3.\nthanks", "1, 2, 3"), ("<answer>The answer is 9.</answer>", "9"),
    ("The answer is 3. No wait, the answer is 5.", "5"), ("The answer is 3.\n答案是 4。", "4"),
    ("<answer>3</answer> The answer is 5.", "5"), ("The answer is 5. <answer>3</answer>", "3"),
    ("42", None), ("", None), ("The answer is", None), ("The answer is .", None),
])
def test_extract_answer_takes_the_last_explicit_answer(text, want):
    assert extract_answer(text) == want


def test_accuracy_reward_reads_the_answer_after_think_only():
    assert accuracy_reward(GOOD, ADD) == 1.0
    assert accuracy_reward(GOOD, ADD.to_dict()) == 1.0  # a stored problem dict works too
    assert accuracy_reward(GOOD, "42") == 1.0  # a plain gold answer
    assert accuracy_reward(GOOD.replace("42.", "41."), ADD) == 0.0
    assert accuracy_reward("so it is 42. The answer is 42.", ADD) == 0.0  # missing </think>
    assert accuracy_reward("The answer is 42.</think>", ADD) == 0.0  # answer only inside the think block
    assert accuracy_reward("think</think>42", ADD) == 0.0  # no explicit answer
    assert accuracy_reward("", ADD) == 0.0 and accuracy_reward("</think>", ADD) == 0.0
    # several answers: the last explicit one counts
    assert accuracy_reward("r</think>The answer is 41. Sorry, the answer is 42.", ADD) == 1.0
    assert accuracy_reward("r</think>The answer is 42. Sorry, the answer is 41.", ADD) == 0.0
    # two </think>: the answer region starts after the first; its last answer counts
    assert accuracy_reward("r</think>The answer is 41.</think>The answer is 42.", ADD) == 1.0
    assert accuracy_reward("<think>r</think>The answer is 42.<｜end▁of▁sentence｜>The answer is 1.", ADD) == 1.0
    assert accuracy_reward("The answer is 42.", ADD, thinking=False) == 1.0


def test_huge_numbers_neither_crash_nor_hang():
    huge = "9" * 10_000
    t = time.perf_counter()
    for problem in (ADD, "42", make_problems("countdown", 1, 3, "en")[0], make_problems("sorting", 1, 5, "en")[0],
                    make_problems("knights", 1, 3, "zh")[0]):
        assert accuracy_reward(f"r</think>The answer is {huge}.", problem) == 0.0
        assert accuracy_reward(f"r</think><answer>{huge}</answer>", problem) == 0.0
        assert accuracy_reward(f"{huge}</think>The answer is {'1, ' * 5000}", problem) == 0.0
    assert accuracy_reward("r</think>" + "The answer is 1. " * 100_000, ADD) == 0.0
    # only the last 4,000 characters are scanned: a 10,000-digit "answer" is no answer at all
    assert format_reward(f"r</think>The answer is {huge}.") == 0.0
    assert format_reward(f"r</think>The answer is {huge[:1000]}.") == 1.0  # well-formed, just wrong
    assert time.perf_counter() - t < 2.0


def test_accuracy_reward_through_math_verify_jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"prompt": "Half of 1?", "answer": "\\frac{1}{2}"}) + "\n")
    p = load_jsonl_task(str(path)).problems[0]
    assert accuracy_reward("r</think>The answer is 0.5.", p) == 1.0
    assert accuracy_reward("r</think>The answer is \\boxed{\\frac{2}{4}}.", p) == 1.0
    assert accuracy_reward("r</think>The answer is 0.25.", p) == 0.0
    assert accuracy_reward("r</think>The answer is \\frac{1}{0}}{.", p) == 0.0  # garbage latex, no exception
    assert accuracy_reward("r</think>The answer is 0.5.", "\\frac{1}{2}") == 1.0


def test_format_reward():
    assert format_reward(GOOD) == 1.0
    assert format_reward("<think>" + GOOD) == 1.0  # a leading <think> is tolerated
    assert format_reward("r</think>答案是 42。<｜end▁of▁sentence｜>junk") == 1.0
    assert format_reward("r</think><answer>42</answer>") == 1.0
    bad = ["The answer is 42.",  # missing </think>
           "r</think>x</think>The answer is 42.",  # two </think>
           "r<think>s</think>The answer is 42.",  # <think> inside
           "r</think>", "r</think>   ",  # empty answer
           "r</think>42",  # not in the convention
           "   </think>The answer is 42.",  # empty reasoning
           "r</think>The answer is 41. The answer is 42.",  # several answers
           "", "</think>"]
    for c in bad:
        assert format_reward(c) == 0.0, c
    assert format_reward("The answer is 42.", thinking=False) == 1.0
    assert format_reward("r</think>The answer is 42.", thinking=False) == 0.0


def test_language_consistency_values():
    assert language_consistency("first add the ones then the tens", "en") == 1.0
    assert language_consistency("first add the ones then the tens", "zh") == 0.0
    assert language_consistency("先算个位再算十位", "zh") == 1.0
    assert language_consistency("one two three 一二三", "en") == 0.5
    assert language_consistency("one two three 一二三", "zh") == 0.5
    assert language_consistency("先算 ones 再算 tens", "zh") == pytest.approx(4 / 6)  # 4 CJK chars, 2 words
    assert language_consistency("个位：7 + 5 = 12，写 2 进 1 (A=骑士)", "zh") == 1.0  # digits, symbols, letters neutral
    assert language_consistency("47 + 35 = 82", "en") == 1.0 and language_consistency("  ", "en") == 0.0
    with pytest.raises(ValueError):
        language_consistency("x", "fr")
    # the reward looks at the chain of thought only, not the answer line
    assert language_consistency_reward("先算个位</think>The answer is 5.", "zh") == 1.0
    assert language_consistency_reward("<think>add the ones 再算十位</think>答案是 5。", "en") == pytest.approx(3 / 7)
    assert language_consistency_reward("", "en") == 0.0


def test_length_penalty_boundaries():
    assert length_penalty(0, 100, 20) == 0.0
    assert length_penalty(80, 100, 20) == 0.0
    assert length_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert length_penalty(100, 100, 20) == -1.0
    assert length_penalty(10**9, 100, 20) == -1.0
    assert length_penalty(100, 100, 0) == 0.0 and length_penalty(101, 100, 0) == -1.0
    for args in ((10, 0, 0), (10, 100, 101), (10, 100, -1)):
        with pytest.raises(ValueError):
            length_penalty(*args)


def test_combine_rewards_weights_and_custom_callable():
    seen = []

    def brevity(prompt, completion, problem):
        seen.append((prompt, completion, problem))
        return 0.25

    fn = combine_rewards({"accuracy": 2.0, "format": 0.5, "language": 0.1, "length": 1.0, "brevity": 4.0},
                         extra={"brevity": brevity}, config=RewardConfig(max_len=100, length_buffer=20))
    total, comps = fn(ADD.prompt, GOOD, ADD, num_tokens=90)
    assert comps == {"accuracy": 1.0, "format": 1.0, "language": 1.0, "length": -0.5, "brevity": 0.25}
    assert total == pytest.approx(2.0 + 0.5 + 0.1 - 0.5 + 1.0)
    assert seen == [(ADD.prompt, GOOD, ADD)]
    # an unweighted extra reward counts with weight 1
    res = combine_rewards({"accuracy": 1.0}, extra={"b": lambda *a: 0.5})("q", "x</think>The answer is 41.", ADD)
    assert res.total == 0.5 and res.components == {"accuracy": 0.0, "b": 0.5}
    # the default: accuracy 1 + format 0.1; the target language comes from the prompt without a Problem
    assert combine_rewards()("What is 40 + 2?", GOOD, "42").total == pytest.approx(1.1)
    lang = combine_rewards({"language": 1.0})
    assert lang("计算 40 + 2。", GOOD, None).total == 0.0 and lang("What?", GOOD, None).total == 1.0
    totals, comps = combine_rewards().batch(["q", "q"], [GOOD, "nope"], [ADD, ADD])
    assert totals == [pytest.approx(1.1), 0.0] and comps["format"] == [1.0, 0.0]


def test_combine_rewards_rejects_bad_configuration():
    with pytest.raises(ValueError, match="unknown reward"):
        combine_rewards({"acc": 1.0})
    with pytest.raises(ValueError, match="clashes"):
        combine_rewards(extra={"format": lambda *a: 1.0})
    with pytest.raises(ValueError, match="finite"):
        combine_rewards({"accuracy": float("nan")})
    with pytest.raises(ValueError, match="non-finite"):
        combine_rewards({"x": 1.0}, extra={"x": lambda *a: float("inf")})("q", GOOD, ADD)


def test_rewards_on_embedded_sft_records_are_perfect_and_on_shuffled_answers_fail():
    recs = embedded_sft_records(200, seed=4, with_problem=True)
    fn = combine_rewards({"accuracy": 1.0, "format": 1.0, "language": 1.0})
    for i, rec in enumerate(recs):
        user, asst = rec["messages"]
        completion = asst["reasoning_content"] + "</think>" + asst["content"]
        assert fn(user["content"], completion, rec["problem"]).components == {"accuracy": 1.0, "format": 1.0,
                                                                                "language": 1.0}
        nxt = recs[(i + 1) % len(recs)]
        other, p, q = nxt["messages"][1], rec["problem"], nxt["problem"]
        swapped = asst["reasoning_content"] + "</think>" + other["content"]
        same = p["answer"] == q["answer"] or (p["task"] == q["task"] == "knights"
                                              and p["meta"]["solution"] == q["meta"]["solution"])
        if not same:
            assert accuracy_reward(swapped, rec["problem"]) == 0.0


def test_find_answers_count_used_by_format():
    assert len(find_answers("The answer is \\boxed{3}.")) == 1
    assert len(find_answers("<answer>The answer is 3.</answer>")) == 1
    assert find_answers("答案是 3。答案是 4。") == ["3", "4"]
