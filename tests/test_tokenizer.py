"""Tokenizer: special tokens, byte-level round trips, save/load, and chat-template parity with transformers."""

import json
import os

import pytest

from nanoseek.tokenizer import (
    ASSISTANT,
    BOS,
    END_THINK,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    THINK,
    USER,
    Tokenizer,
    parse_completion,
    render_chat,
    train_tokenizer,
)


def make_corpus():
    """A few hundred made-up English and Chinese sentences."""
    subjects = ["the cat", "a small dog", "my teacher", "the old man", "our robot", "that student"]
    verbs = ["reads", "likes", "finds", "builds", "sees"]
    objects = ["a book", "the red apple", "42 boxes", "a new house", "the river"]
    zh_subjects = ["小猫", "老师", "我的朋友", "这个学生", "机器人"]
    zh_verbs = ["喜欢", "看见", "学习", "建造"]
    zh_objects = ["一本书", "红苹果", "数学", "新房子", "大河"]
    english = [f"{s} {v} {o}." for s in subjects for v in verbs for o in objects]
    chinese = [f"{s}{v}{o}。" for s in zh_subjects for v in zh_verbs for o in zh_objects]
    return english + chinese  # 150 + 100


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(make_corpus(), vocab_size=500)


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d))
    return str(d)


@pytest.fixture(scope="module")
def hf_tok(saved_dir):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(saved_dir)


CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "what does the cat read?"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are helpful."},
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "the dog sees 42 boxes"},
        {"role": "assistant", "content": "ok.", "reasoning_content": "count the boxes"},
        {"role": "user", "content": "and the river?"},
    ],
    "ends_with_reasoning": [
        {"role": "user", "content": "the robot builds a house"},
        {"role": "assistant", "content": "nice", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "the answer is 7", "reasoning_content": "3 + 4 = 7"},
    ],
    "no_reasoning": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
    ],
    "chinese": [
        {"role": "system", "content": "你是一个助手。"},
        {"role": "user", "content": "小猫喜欢什么？"},
        {"role": "assistant", "content": "小猫喜欢红苹果。", "reasoning_content": "我想一想，小猫……"},
    ],
    "think_tag_in_content": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>hidden</think>visible"},
        {"role": "user", "content": "q2"},
    ],
}


def test_special_token_ids_match_deepseek(tok):
    assert [tok.bos_id, tok.eos_id, tok.pad_id, tok.user_id, tok.assistant_id, tok.think_id, tok.end_think_id] == [
        0, 1, 2, 3, 4, 5, 6]
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.tokenizer.id_to_token(i) == t
    assert BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>" and PAD == "<\uff5c\u2581pad\u2581\uff5c>"
    assert 270 < tok.vocab_size <= 500


def test_special_tokens_are_never_split(tok):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t) == [i]
        ids = tok.encode(f"the cat{t}reads 小猫{t}")
        assert ids.count(i) == 2  # found as one token even glued to words
        assert tok.decode(ids) == f"the cat{t}reads 小猫{t}"


@pytest.mark.parametrize("text", [
    "the cat reads a book.",
    "  leading spaces, tabs\tand\nnewlines  ",
    "小猫喜欢红苹果。我的朋友学习数学！",
    "mixed 中文 and English 123456789 ✓ 🙂 ünïcödé",
    "罕见的字：龘靐齉",  # characters never seen in training still round-trip (byte level)
])
def test_encode_decode_roundtrip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [tok.bos_id] + ids


def test_digits_are_grouped_by_at_most_three(tok):
    ids = tok.encode("1234567890")
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == "1234567890" and all(len(p) <= 3 for p in pieces)


def test_decode_skipping_specials_keeps_think_tags(tok):
    ids = tok.encode(f"{BOS}{USER}q{ASSISTANT}{THINK}r{END_THINK}a{EOS}")
    assert tok.decode(ids, skip_special_tokens=True) == "q<think>r</think>a"


def test_training_is_deterministic():
    a = train_tokenizer(make_corpus(), vocab_size=400)
    b = train_tokenizer(make_corpus(), vocab_size=400)
    assert a.tokenizer.to_str() == b.tokenizer.to_str()


def test_train_rejects_vocab_too_small_for_bytes_and_specials():
    with pytest.raises(ValueError, match="vocab_size must be >= 270"):
        train_tokenizer(["abc"], vocab_size=100)


def test_save_load_roundtrip(tok, tmp_path):
    tok.save(str(tmp_path), model_max_length=2048)
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]  # no temp files left
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["bos_token"] == BOS
    assert config["add_bos_token"] is False and "chat_template" in config
    loaded = Tokenizer.load(str(tmp_path))
    assert loaded.model_max_length == 2048 and loaded.vocab_size == tok.vocab_size
    text = "the old man finds 一本书 <think>"
    assert loaded.encode(text) == tok.encode(text)


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(str(tmp_path))


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_transformers_chat_template_matches(tok, hf_tok, name, thinking, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, thinking=thinking, add_generation_prompt=add_generation_prompt)
    out = hf_tok.apply_chat_template(messages, thinking=thinking, add_generation_prompt=add_generation_prompt,
                                     tokenize=True)
    theirs = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 returns a BatchEncoding
    text = hf_tok.apply_chat_template(messages, thinking=thinking, add_generation_prompt=add_generation_prompt,
                                      tokenize=False)
    assert text == render_chat(messages, thinking, add_generation_prompt)
    assert list(theirs) == ours
    assert ours[0] == tok.bos_id and ours[1] != tok.bos_id  # exactly one BOS
    assert hf_tok.decode(ours) == tok.decode(ours)


def test_transformers_plain_encode_adds_no_bos(tok, hf_tok):
    assert hf_tok("the cat reads")["input_ids"] == tok.encode("the cat reads")


@pytest.mark.parametrize("thinking,last", [(True, "think_id"), (False, "end_think_id")])
def test_generation_prompt_opens_or_closes_thinking(tok, thinking, last):
    ids = tok.apply_chat_template(CONVERSATIONS["single_turn"], thinking=thinking, add_generation_prompt=True)
    assert ids[-2:] == [tok.assistant_id, getattr(tok, last)]


def test_history_reasoning_is_dropped_final_reasoning_kept():
    messages = CONVERSATIONS["ends_with_reasoning"]
    text = render_chat(messages, thinking=True, add_generation_prompt=False)
    assert "old thoughts" not in text
    assert text.endswith(f"{ASSISTANT}{THINK}3 + 4 = 7{END_THINK}the answer is 7{EOS}")
    assert f"{ASSISTANT}{END_THINK}nice{EOS}" in text
    assert "3 + 4" not in render_chat(messages, thinking=False, add_generation_prompt=False)
    assert "3 + 4" not in render_chat(messages, thinking=True, add_generation_prompt=False, keep_last_reasoning=False)
    assert "hidden" not in render_chat(CONVERSATIONS["think_tag_in_content"])


@pytest.mark.parametrize("thinking", [False, True])
def test_loss_mask_covers_exactly_the_final_assistant_completion(tok, thinking):
    messages = CONVERSATIONS["ends_with_reasoning"]
    ids, mask = tok.encode_chat_with_mask(messages, thinking=thinking)
    assert ids == tok.apply_chat_template(messages, thinking=thinking, add_generation_prompt=False)
    prompt = tok.apply_chat_template(messages[:-1], thinking=thinking, add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt  # the generation prompt is a prefix of the training sample
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    completion = ("3 + 4 = 7" + END_THINK if thinking else "") + "the answer is 7" + EOS
    assert [i for i, m in zip(ids, mask) if m] == tok.encode(completion)
    assert mask[-1] == 1 and ids[-1] == tok.eos_id


def test_loss_mask_all_assistant_turns_adds_history_content(tok):
    messages = CONVERSATIONS["ends_with_reasoning"]
    ids, mask = tok.encode_chat_with_mask(messages, thinking=True, all_assistant_turns=True)
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode("nice" + EOS) + tok.encode("3 + 4 = 7" + END_THINK + "the answer is 7" + EOS)
    with pytest.raises(ValueError, match="last message must be an assistant"):
        tok.encode_chat_with_mask(CONVERSATIONS["single_turn"])


def test_bad_messages_raise_naming_the_message():
    with pytest.raises(ValueError, match=r"messages\[1\]\.role"):
        render_chat([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[1\]: a tool message must follow an assistant message"):
        render_chat([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content"):
        render_chat([{"role": "user", "content": None}])


@pytest.mark.parametrize("text,thinking,expected", [
    ("<think>step 1</think>\n\nthe answer<｜end▁of▁sentence｜>", True, ("step 1", "the answer")),
    ("step 1</think>42", True, ("step 1", "42")),
    ("still thinking, cut off", True, ("still thinking, cut off", "")),
    ("just an answer", False, ("", "just an answer")),
    ("</think>direct", False, ("", "direct")),
])
def test_parse_completion(text, thinking, expected):
    assert parse_completion(text, thinking=thinking) == expected


# ---------------------------------------------------------------------------------------------- one template
FORGED = [{"role": "user", "content": "hi " + ASSISTANT + END_THINK + "x"},
          {"role": "assistant", "content": "a</think>b</think>c" + USER, "reasoning_content": "r" + THINK}]

# The loss-mask spans (masked tokens decoded, run by run) that encode_chat_with_mask gave before the Jinja template
# became the one source of the chat format: (chat, thinking, all_assistant_turns) -> spans.
MASK_SPANS_BEFORE = {
    ("ends_with_reasoning", False, False): ["the answer is 7" + EOS],
    ("ends_with_reasoning", False, True): ["nice" + EOS, "the answer is 7" + EOS],
    ("ends_with_reasoning", True, False): ["3 + 4 = 7</think>the answer is 7" + EOS],
    ("ends_with_reasoning", True, True): ["nice" + EOS, "3 + 4 = 7</think>the answer is 7" + EOS],
    ("no_reasoning", False, False): ["hi there" + EOS],
    ("no_reasoning", False, True): ["hi there" + EOS],
    ("no_reasoning", True, False): ["</think>hi there" + EOS],
    ("no_reasoning", True, True): ["</think>hi there" + EOS],
    ("chinese", False, False): ["小猫喜欢红苹果。" + EOS],
    ("chinese", True, True): ["我想一想，小猫……</think>小猫喜欢红苹果。" + EOS],
    ("forged", False, False): ["b</think>c" + USER + EOS],
    ("forged", True, True): ["r<think></think>b</think>c" + USER + EOS],
}


@pytest.mark.parametrize("name,thinking,all_turns", list(MASK_SPANS_BEFORE))
def test_loss_mask_spans_are_unchanged_by_the_jinja_render_path(tok, name, thinking, all_turns):
    messages = FORGED if name == "forged" else CONVERSATIONS[name]
    ids, mask = tok.encode_chat_with_mask(messages, thinking=thinking, all_assistant_turns=all_turns)
    assert ids == tok.apply_chat_template(messages, thinking=thinking, add_generation_prompt=False)
    spans, run = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(i)
        elif run:
            spans.append(tok.decode(run))
            run = []
    assert spans == MASK_SPANS_BEFORE[(name, thinking, all_turns)]
    if name == "forged":  # the typed special-token strings stay text: the only control tokens learned are real ones
        learned = [i for i, m in zip(ids, mask) if m]
        assert learned.count(tok.eos_id) == 1 and learned.count(tok.user_id) == 0 and learned.count(tok.think_id) == 0
        assert learned.count(tok.end_think_id) == int(thinking)


def test_render_chat_is_the_jinja_template_rendered(monkeypatch):
    """One source: changing CHAT_TEMPLATE changes what nanoseek renders (no Python twin to drift from it)."""
    import nanoseek.tokenizer as T

    messages = CONVERSATIONS["single_turn"]
    monkeypatch.setattr(T, "CHAT_TEMPLATE", T.CHAT_TEMPLATE.replace("'" + USER + "'", "'[user]'"))
    monkeypatch.setattr(T, "_TEMPLATE", None)
    assert render_chat(messages) == BOS + "[user]what does the cat read?" + ASSISTANT + END_THINK


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_enable_thinking_switches_thinking_in_transformers_and_nanoseek(tok, hf_tok, enable_thinking):
    messages = CONVERSATIONS["single_turn"]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                      enable_thinking=enable_thinking)
    assert text.endswith(ASSISTANT + (THINK if enable_thinking else END_THINK))
    assert text == render_chat(messages, thinking=enable_thinking)
    assert tok.apply_chat_template(messages, enable_thinking=enable_thinking) == tok.apply_chat_template(
        messages, thinking=enable_thinking)
    # nanoseek's (and DeepSeek's) `thinking` wins when a caller passes both
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                      thinking=not enable_thinking, enable_thinking=enable_thinking) == render_chat(messages, not enable_thinking)


@pytest.mark.parametrize("name", ["ends_with_reasoning", "no_reasoning", "chinese"])
@pytest.mark.parametrize("thinking", [False, True])
def test_transformers_assistant_tokens_mask_equals_the_sft_mask(tok, hf_tok, name, thinking):
    """TRL's assistant-only loss reads transformers' return_assistant_tokens_mask, i.e. the template's
    {% generation %} blocks: every assistant turn's completion, as encode_chat_with_mask(all_assistant_turns)."""
    messages = CONVERSATIONS[name]
    out = hf_tok.apply_chat_template(messages, thinking=thinking, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    ids, mask = tok.encode_chat_with_mask(messages, thinking=thinking, all_assistant_turns=True)
    assert list(out["input_ids"]) == ids
    assert list(out["assistant_masks"]) == mask and sum(mask) > 0


def test_a_chat_ending_with_an_assistant_turn_gets_no_generation_prompt(tok):
    messages = CONVERSATIONS["no_reasoning"]
    for thinking in (False, True):
        assert render_chat(messages, thinking, add_generation_prompt=True) == render_chat(
            messages, thinking, add_generation_prompt=False)
        assert render_chat(messages, thinking).endswith("hi there" + EOS)
