"""Embedded verifiable tasks, the registry and the embedded corpus built from them."""

import itertools
import json
import random
import re
import time

import pytest

from nanoseek.data.corpus import embedded_corpus, embedded_sft_records
from nanoseek.tasks import (LANGS, LEVELS, TASKS, Problem, get_task, load_jsonl_task, make_problems, register_task,
                            solve, split_of, verify_answer)
from nanoseek.tasks.knights import consistent

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_solution_verifies_at_every_level_in_both_languages(name):
    task = get_task(name)
    for level, lang in itertools.product(LEVELS, LANGS):
        for p in make_problems(name, 25, level, lang, seed=3):
            reasoning, answer = task.solution(p)
            assert answer == p.answer
            assert task.verify(p, answer), (p, answer)
            assert reasoning.strip() and len(reasoning.splitlines()) <= 25
            if lang == "zh":
                assert CJK.search(reasoning) and CJK.search(p.prompt)
            else:
                assert not CJK.search(reasoning) and not CJK.search(p.prompt)
            json.dumps(p.to_dict())  # meta stays serialisable
            assert Problem.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_column_subtraction_writes_both_digits_before_it_decides_to_borrow(lang):
    """Every column line of a worked subtraction is a true equation, a column that borrows first states its plain
    difference (both digits visible) and only then "borrow 1" and the borrowed difference, and the columns spell
    the result. (The old lines opened with "12 - 4": the borrow chosen before either digit was written, where the
    trained models made most of their level-2 mistakes.)"""
    from nanoseek.tasks.arithmetic import _sub_steps
    sep, borrow = ("：", "，借 1：") if lang == "zh" else (": ", ", borrow 1: ")
    for a in range(0, 1200, 7):
        for b in range(0, a + 1, 13):
            digits = []
            for line in _sub_steps(a, b, lang):
                body = line.split(sep, 1)[1]
                if borrow in body:
                    plain, borrowed = body.split(borrow)
                    assert eval(plain) < 0 and borrowed.startswith("1") and eval(borrowed.replace(" = ", " == "))
                    assert borrowed.split(" = ")[0] == "1" + plain, line
                    digits.append(borrowed.split(" = ")[1])
                elif " = " in body:
                    assert eval(body.replace(" = ", " == ")) and int(body.split(" = ")[1]) >= 0, line
                    digits.append(body.split(" = ")[1])
                else:
                    digits.append(body)
            assert int("".join(reversed(digits))) == a - b, (a, b)


def test_wrong_answers_fail():
    for level in LEVELS:
        ar = make_problems("arithmetic", 20, level, "en", seed=1)
        for p in ar:
            assert not verify_answer(p, str(int(p.answer) + 1))
            assert verify_answer(p, f"{p.answer}") and not verify_answer(p, "")
        for p in make_problems("sorting", 20, level, "zh", seed=1):
            nums = p.meta["numbers"]
            wrong = sorted(nums, reverse=p.meta["order"] == "asc")
            if wrong != sorted(nums, reverse=p.meta["order"] == "desc"):
                assert not verify_answer(p, ", ".join(map(str, wrong)))
            assert not verify_answer(p, p.answer + ", 5")  # an extra element
        for p in make_problems("knights", 20, level, "en", seed=1):
            flipped = {k: not v for k, v in p.meta["solution"].items()}
            text = ", ".join(f"{k}: {'knight' if v else 'knave'}" for k, v in sorted(flipped.items()))
            assert not verify_answer(p, text)
            assert not verify_answer(p, "A: knight")  # incomplete
        for p in make_problems("countdown", 20, level, "en", seed=1):
            assert not verify_answer(p, "1 + 1" if p.meta["target"] != 2 else "1 + 2")
            assert not verify_answer(p, str(p.meta["target"]))  # the target itself is not given


def test_arithmetic_accepts_harmless_variants_only():
    p = Problem("arithmetic", 4, "en", "What is 1000 + 234?", "1234", {"nums": [1000, 234], "ops": ["+"]})
    for ok in ("1234", " 1234 ", "1,234", "1000 + 234 = 1234", "+1234"):
        assert verify_answer(p, ok), ok
    for bad in ("12 34", "1234.5", "1e3", "", "9" * 10_000, "x"):
        assert not verify_answer(p, bad), bad


def test_knights_answers_in_either_language_and_solution_is_unique():
    for level in LEVELS:
        for p in make_problems("knights", 30, level, "zh", seed=5):
            people = p.meta["people"]
            worlds = [dict(zip(people, r)) for r in itertools.product((True, False), repeat=len(people))]
            sols = [w for w in worlds if consistent(w, p.meta["says"]) is None]
            assert sols == [p.meta["solution"]]
            en = ", ".join(f"{k} is a {'knight' if v else 'knave'}" for k, v in sorted(sols[0].items()))
            assert verify_answer(p, en) and verify_answer(p, p.answer)
    p = make_problems("knights", 1, 2, "en", seed=0)[0]
    a = p.answer.split(", ")[0].split(": ")[0]
    assert not verify_answer(p, f"{p.answer}, {a}: knave, {a}: knight")  # contradictory claims


def _cd(numbers, target):
    return Problem("countdown", 3, "en", "", "", {"numbers": numbers, "target": target})


def test_countdown_verifier_accepts_exact_expressions():
    p = _cd([3, 5, 2, 7], 17)
    for ok in ("3 * 5 + 2", "(3*5)+2", "3 × 5 + 2", "3 * 5 + 2 = 17", "2 + 5 * 3"):
        assert verify_answer(p, ok), ok
    assert verify_answer(_cd([8, 3, 3], 8), "8 / 3 * 3")  # exact via fractions
    assert verify_answer(_cd([4, 4], 8), "4 + 4")  # a number given twice may be used twice


def test_countdown_verifier_rejects_cheats_and_code():
    p = _cd([3, 5, 2, 7], 17)
    cheats = ["3 * 5 + 2 + 2 - 2",  # reuses 2
              "10 + 7",  # 10 was not given
              "17",  # not given
              "3 * 5 + 2 = 18",  # wrong stated result
              "(7 + 3) / 2 + 5 * 2",  # 2 twice
              "3 ** 2 + 8", "-3 + 20", "3 * 5 + 2.0", "3 * 5 + True",
              "__import__('os').system('echo hacked')", "(lambda: 17)()", "open('x')", "x", "[17][0]",
              "17 if 1 else 0", "3 * 5 + 2; import os", "", "(" * 300 + "17" + ")" * 300, "1" * 5000]
    for bad in cheats:
        assert not verify_answer(p, bad), bad
    assert not verify_answer(_cd([7, 2, 1], 3), "7 / 2")  # 3.5 is not 3: no floor division
    assert not verify_answer(_cd([7, 2, 1], 3), "7 // 2")
    assert not verify_answer(_cd([7, 0, 1], 3), "7 / 0")


def test_generation_is_deterministic_by_seed_and_varies_across_seeds():
    for name in TASKS:
        a = make_problems(name, 20, 3, "en", seed=11)
        assert a == make_problems(name, 20, 3, "en", seed=11)
        assert [p.prompt for p in a] != [p.prompt for p in make_problems(name, 20, 3, "en", seed=12)]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_and_test_splits_are_disjoint(name):
    for level in (1, 3, 5):
        train = make_problems(name, 400, level, "en", seed=0, split="train")
        test = make_problems(name, 100, level, "en", seed=0, split="test")
        t = get_task(name)
        assert {t.key(p) for p in train}.isdisjoint({t.key(p) for p in test})
        assert {p.prompt for p in train}.isdisjoint({p.prompt for p in test})
        assert all(split_of(t.split_task or name, t.key(p)) == "test" for p in test)  # derived: the base's split
    # the same problem in Chinese stays in its split
    zh_test = make_problems(name, 50, 2, "zh", seed=0, split="test")
    t = get_task(name)
    assert all(split_of(t.split_task or name, t.key(p)) == "test" for p in zh_test)


def test_levels_get_harder():
    small = max(max(p.meta["nums"]) for p in make_problems("arithmetic", 50, 1, "en"))
    big = max(max(p.meta["nums"]) for p in make_problems("arithmetic", 50, 5, "en"))
    assert small < 100 <= big
    assert all(len(p.meta["numbers"]) == 3 for p in make_problems("sorting", 20, 1, "en"))
    assert all(len(p.meta["numbers"]) == 8 for p in make_problems("sorting", 20, 5, "en"))


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")
    with pytest.raises(ValueError, match="level"):
        make_problems("arithmetic", 1, level=9)
    with pytest.raises(ValueError, match="lang"):
        make_problems("sorting", 1, level=1, lang="fr")
    with pytest.raises(ValueError, match="split"):
        make_problems("sorting", 1, level=1, split="dev")


def test_jsonl_task_uses_math_verify(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [{"prompt": "Half of 1?", "answer": "\\frac{1}{2}"}, {"prompt": "2+2?", "answer": 4, "lang": "en"},
            {"prompt": "x plus one?", "answer": "x+1", "reasoning": "add one"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_jsonl_task(str(path))
    assert task.name == "jsonl:math" and len(task.problems) == 3
    half, four, poly = task.problems
    assert task.verify(half, "0.5") and task.verify(half, "1/2") and task.verify(half, "$\\frac{1}{2}$")
    assert not task.verify(half, "0.6") and not task.verify(half, "") and not task.verify(half, "}{\\frac")
    assert task.verify(four, "4") and task.verify(four, "4.0") and not task.verify(four, "5")
    assert task.verify(poly, "1+x") and task.solution(poly) == ("add one", "x+1")
    assert not task.verify(four, "9" * 10_000)  # capped, no hang, no crash
    t0 = time.perf_counter()
    for tower in ("2^{2^{2^{2^{2^{2}}}}}", "2^2^2^2^2^2", "9^{99999}", "99999!", "9**9**9"):
        assert not task.verify(four, tower)  # refused before sympy could run for minutes
    assert time.perf_counter() - t0 < 1.0
    assert task.verify(poly, "x + 1") and not task.verify(poly, "x^2 + 1")
    # unregistered problems still verify through their meta
    assert verify_answer(half, "0.5")
    register_task(task)
    try:
        assert get_task("jsonl:math") is task
        assert make_problems(task, 2, 1, "en", seed=0, split="train") == make_problems(task, 2, 1, "en", seed=0)
    finally:
        TASKS.pop("jsonl:math")


@pytest.mark.parametrize("content,msg", [('{"prompt": "a", "answer": 1}\n{"prompt": "b"}\n', ":2: missing key 'answer'"),
                                         ('{"prompt": "a", "answer": 1}\nnot json\n', ":2: invalid JSON"),
                                         ('[1, 2]\n', ":1: expected a JSON object"),
                                         ('{"prompt": "a", "answer": 1, "lang": "fr"}\n', ":1: lang")])
def test_jsonl_errors_name_file_and_line(tmp_path, content, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape("bad.jsonl" + msg)):
        load_jsonl_task(str(path))


def test_embedded_corpus_covers_tasks_languages_and_holds_no_test_problems():
    docs = embedded_corpus(300, seed=0)
    assert docs == embedded_corpus(300, seed=0) and docs != embedded_corpus(300, seed=1)
    text = "\n".join(docs)
    assert "The answer is" in text and "答案是" in text and "</think>" in text
    for word in ("carry", "进", "knight", "骑士", "smallest", "目标"):
        assert word in text, word
    test_prompts = {p.prompt for n in TASKS for p in make_problems(n, 50, 1, "en", seed=0, split="test")}
    assert not any(tp in text for tp in test_prompts if len(tp) > 12)
    only = embedded_corpus(20, seed=0, langs=("en",), tasks=["sorting"], levels=(1,))
    assert all("ort" in d and not CJK.search(d) for d in only)
    with pytest.raises(ValueError):
        embedded_corpus(3, langs=("de",))


def test_sft_records_are_chat_messages_with_verified_answers():
    recs = embedded_sft_records(60, seed=2, with_problem=True)
    assert recs[0].keys() == {"messages", "problem"}
    assert set(embedded_sft_records(2)[0]) == {"messages"}
    for rec in recs:
        user, asst = rec["messages"]
        assert user["role"] == "user" and asst["role"] == "assistant" and asst["reasoning_content"]
        p = Problem.from_dict(rec["problem"])
        assert user["content"] == p.prompt and solve(p)[0] == asst["reasoning_content"]
        assert asst["content"] in (f"The answer is {p.answer}.", f"答案是 {p.answer}。")
    assert {Problem.from_dict(r["problem"]).lang for r in recs} == {"en", "zh"}


def test_random_state_is_not_touched():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    make_problems("countdown", 5, 4, "zh", seed=9)
    embedded_corpus(3, seed=1)
    assert random.random() == expected
