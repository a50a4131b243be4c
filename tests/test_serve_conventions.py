"""What vLLM / SGLang users expect of an OpenAI server (issue 12, items 9 and 10), over real HTTP: `reasoning` beside
`reasoning_content`, content with its whitespace, special tokens hidden by default, max_tokens past the context
refused, /metrics, /tokenize, /detokenize, /version, the schema behind the API key, generation_config.json defaults,
and the sampling options min_p, min_tokens, repetition_penalty, skip_special_tokens, include_stop_str_in_output."""

from __future__ import annotations

import json
import random
import types

import httpx
import pytest
import torch

from test_cli_inference import ANSWER, MODEL, REASON, USERS
from test_serve import LiveServer, chat, loaded, model_dir  # noqa: F401 (fixtures)

from nanoseek.engine.sampling import SamplingParams, penalize, process_logits
from nanoseek.serve.reasoning import ReasoningSplitter
from nanoseek.tokenizer import EOS, END_THINK, parse_completion


@pytest.fixture(scope="module")
def live(loaded):  # noqa: F811
    from nanoseek.serve.server import create_app

    srv = LiveServer(create_app(*loaded, MODEL, max_batch_size=8, max_len=128))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def root(live) -> str:
    return live.url.removesuffix("/v1")


# ---------------------------------------------------------------------------------------------- item 10
def test_reasoning_is_sent_beside_reasoning_content(client):
    msg = chat(client).choices[0].message
    assert msg.reasoning_content == REASON and msg.model_extra["reasoning"] == REASON and msg.content == ANSWER
    deltas = [c.choices[0].delta for c in chat(client, stream=True) if c.choices]
    streamed = [(d.model_extra.get("reasoning_content"), d.model_extra.get("reasoning")) for d in deltas
                if d.model_extra.get("reasoning_content")]
    assert streamed and all(a == b for a, b in streamed) and "".join(a for a, _ in streamed) == REASON


def test_content_keeps_its_whitespace_streamed_or_not():
    pieces = ["a", " b ", "\n", END_THINK, "  ", "x y", "\n\n", EOS[:3], EOS[3:], " "]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        for thinking in (True, False):
            sp, parts = ReasoningSplitter(thinking, strip_answer=False), ["", ""]
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 4))))
            for a, b in zip([0] + cuts, cuts + [len(text)]):
                for k, d in enumerate(sp.feed(text[a:b])):
                    parts[k] += d
            for k, d in enumerate(sp.finish()):
                parts[k] += d
            assert tuple(parts) == parse_completion(text, thinking, strip_answer=False), text
    assert parse_completion("r" + END_THINK + "\n  two spaces \n", strip_answer=False) == ("r", "\n  two spaces \n")


def test_special_tokens_are_hidden_unless_asked_for(client):
    kw = dict(model=MODEL, prompt="The cat", max_tokens=10, temperature=0, logprobs=1,
              extra_body={"ignore_eos": True})  # this model says EOS within 10 tokens, then goes on
    shown = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "skip_special_tokens": False}})
    assert EOS in shown.choices[0].text
    hidden = client.completions.create(**kw).choices[0]
    assert EOS not in hidden.text and hidden.text == shown.choices[0].text.replace(EOS, "")
    assert "".join(hidden.logprobs.tokens) == hidden.text  # the token strings still join to the text


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_past_the_context_is_a_400_naming_it(live, field):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: 128}  # the context is 128
    status, out = live.post_raw("/chat/completions", json.dumps(body).encode())
    assert status == 400 and out["error"]["param"] == field and "128" in out["error"]["message"], out
    status, out = live.post_raw("/completions", json.dumps({"prompt": "The cat", "max_tokens": 127}).encode())
    assert status == 400 and out["error"]["param"] == "max_tokens"
    status, _ = live.post_raw("/completions", json.dumps({"prompt": "The cat", "max_tokens": 100}).encode())
    assert status == 200


def test_a_chat_ending_with_an_assistant_turn_is_refused(live):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ANSWER}]
    status, out = live.post_raw("/chat/completions", json.dumps({"messages": msgs}).encode())
    assert status == 400 and out["error"]["param"] == "messages" and "messages[1]" in out["error"]["message"]


def test_metrics_count_requests_tokens_and_latency(client, live):
    chat(client, max_tokens=4)
    text = httpx.get(root(live) + "/metrics", timeout=30).text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert int(lines['nanoseek_requests_total{endpoint="/v1/chat/completions",status="200"}']) >= 1
    assert int(lines['nanoseek_request_latency_seconds_count{endpoint="/v1/chat/completions"}']) >= 1
    assert int(lines["nanoseek_generation_tokens_total"]) >= 1 and int(lines["nanoseek_prompt_tokens_total"]) >= 1
    assert {"nanoseek_num_requests_waiting", "nanoseek_num_requests_running"} <= set(lines)
    assert "# TYPE nanoseek_request_latency_seconds histogram" in text


def test_tokenize_detokenize_and_version(live, loaded):  # noqa: F811
    tok = loaded[1]
    msgs = [{"role": "user", "content": USERS[1]}]
    r = httpx.post(root(live) + "/tokenize", json={"messages": msgs}, timeout=30).json()
    assert r["tokens"] == tok.apply_chat_template(msgs, thinking=True) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 128
    r = httpx.post(root(live) + "/tokenize", json={"prompt": "The cat"}, timeout=30).json()
    assert r["tokens"] == tok.encode("The cat")
    r = httpx.post(root(live) + "/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()
    assert r == {"prompt": "The cat"}
    bad = httpx.post(root(live) + "/detokenize", json={"tokens": [10 ** 9]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    bad = httpx.post(root(live) + "/tokenize", json={"prompt": "x", "typo": 1}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "typo"
    import nanoseek

    assert httpx.get(root(live) + "/version", timeout=30).json() == {"version": nanoseek.__version__}


def test_docs_need_the_key_and_bearer_is_case_insensitive(loaded):  # noqa: F811
    from nanoseek.serve.server import create_app

    srv = LiveServer(create_app(*loaded, MODEL, api_key="sekret", max_batch_size=2, max_len=128))
    try:
        base = root(srv)
        for path in ("/docs", "/openapi.json"):
            assert httpx.get(base + path, timeout=30).status_code == 401
            assert httpx.get(base + path, headers={"Authorization": "bearer sekret"}, timeout=30).status_code == 200
        spec = httpx.get(base + "/openapi.json", headers={"Authorization": "Bearer sekret"}, timeout=30).json()
        assert "/v1/chat/completions" in spec["paths"] and "/tokenize" in spec["paths"]
        for scheme in ("Bearer", "bearer", "BEARER"):
            r = httpx.get(base + "/v1/models", headers={"Authorization": f"{scheme} sekret"}, timeout=30)
            assert r.status_code == 200, scheme
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Basic sekret"}, timeout=30).status_code == 401
        assert httpx.post(base + "/tokenize", json={"prompt": "x"}, timeout=30).status_code == 401
    finally:
        srv.close()


def test_generation_config_is_saved_and_read_by_transformers_server_and_cli(model_dir, tmp_path):  # noqa: F811
    from transformers import GenerationConfig

    from nanoseek.checkpoint import GENERATION_DEFAULTS, generation_defaults
    from nanoseek.serve import commands
    from nanoseek.serve.protocol import sampling_params

    g = GenerationConfig.from_pretrained(model_dir)  # every saved model has one (save_pretrained writes it)
    assert (g.temperature, g.top_p, g.do_sample) == (GENERATION_DEFAULTS["temperature"], GENERATION_DEFAULTS["top_p"],
                                                     True)
    assert generation_defaults(model_dir) == GENERATION_DEFAULTS
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_p": 0.5}))
    d = generation_defaults(tmp_path)
    assert d == {"temperature": 0.3, "top_p": 0.5}
    p = sampling_params({}, 16, 100, 128, defaults=d)  # the server: a request naming neither gets the file's
    assert (p.temperature, p.top_p) == (0.3, 0.5)
    assert sampling_params({"temperature": 1.0}, 16, 100, 128, defaults=d).temperature == 1.0
    args = types.SimpleNamespace(model=str(tmp_path), temperature=None, top_p=0.9)  # the CLI: flags win
    commands._generation_defaults(args)
    assert (args.temperature, args.top_p) == (0.3, 0.9)


# ---------------------------------------------------------------------------------------------- item 9
def test_min_p_drops_tokens_below_the_fraction_of_the_top_one():
    logits = torch.tensor([[2.0, 1.5, 0.0, -3.0]])
    probs = logits.softmax(-1)[0]
    for min_p in (0.0, 0.5, 0.2, 1.0):
        _, support = process_logits(logits, [SamplingParams(min_p=min_p)])
        assert support[0].tolist() == (probs >= min_p * probs.max()).tolist(), min_p
    logp, _ = process_logits(logits, [SamplingParams(min_p=0.5)])
    assert torch.allclose(logp[0, :2].exp().sum(), torch.tensor(1.0))  # renormalised over the kept tokens


def test_repetition_penalty_and_min_tokens_adjust_logits_before_sampling():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    out = penalize(logits, [SamplingParams(repetition_penalty=2.0)], [[0, 1]], [0], [[3]])
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]] and logits.tolist() == [[2.0, -1.0, 3.0, 0.5]]
    out = penalize(logits, [SamplingParams(min_tokens=2, max_tokens=4)], [[]], [1], [[3, 2]])
    assert out[0, 2] == out[0, 3] == float("-inf") and out[0, 0] == 2.0
    assert penalize(logits, [SamplingParams(min_tokens=2, max_tokens=4)], [[]], [2], [[3]]) is logits
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_min_tokens_holds_off_the_end_over_http(client):
    short = chat(client, extra_body={"thinking": {"type": "disabled"}}, max_tokens=40)
    n = short.usage.completion_tokens
    assert short.choices[0].finish_reason == "stop" and n < 20
    long = chat(client, extra_body={"thinking": {"type": "disabled"}, "min_tokens": 20}, max_tokens=40)
    assert long.usage.completion_tokens >= 20


def test_repetition_penalty_changes_greedy_text_over_http(client):
    kw = dict(model=MODEL, prompt="The cat", max_tokens=24, temperature=0, logprobs=0)
    plain = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0]
    mild = client.completions.create(**kw, extra_body={"ignore_eos": True, "repetition_penalty": 3.0}).choices[0]
    assert mild.logprobs.token_logprobs[0] < plain.logprobs.token_logprobs[0] - 1  # the prompt's "t" is penalised
    strong = client.completions.create(**kw, extra_body={"ignore_eos": True, "repetition_penalty": 100.0})
    assert strong.choices[0].text != plain.text


def test_include_stop_str_in_output(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": USERS[1]}], temperature=0, stop=["is"],
              max_tokens=30)
    cut = client.chat.completions.create(**kw, extra_body={"thinking": {"type": "disabled"}})
    kept = client.chat.completions.create(**kw, extra_body={"thinking": {"type": "disabled"},
                                                            "include_stop_str_in_output": True})
    assert ANSWER.startswith(cut.choices[0].message.content) and not cut.choices[0].message.content.endswith("is")
    assert kept.choices[0].message.content == cut.choices[0].message.content + "is"
