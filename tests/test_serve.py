"""The OpenAI-compatible server, driven over real HTTP by the official `openai` client.

The model (test_cli_inference.build_chat_model) is a micro DeepSeek trained for a few seconds to answer
the chat prompts USERS with REASON</think>ANSWER (thinking) or ANSWER (not thinking), so the
reasoning/content split is checkable; raw completions give prompt-dependent text."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import openai  # noqa: E402
import uvicorn  # noqa: E402
import fastapi  # noqa: E402,F401

from test_cli_inference import ANSWER, MODEL, REASON, USERS, build_chat_model  # noqa: E402

from nanoseek.serve.reasoning import ReasoningSplitter  # noqa: E402
from nanoseek.tokenizer import END_THINK, EOS, parse_completion  # noqa: E402


class LiveServer:
    """uvicorn serving an app on a free 127.0.0.1 port from a background thread."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def client(self, api_key: str = "none"):
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=60)

    def post_raw(self, path: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self):
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return build_chat_model(tmp_path_factory.getbasetemp() / "serve_chat_model")


@pytest.fixture(scope="module")
def loaded(model_dir):
    from nanoseek.serve.commands import load_model

    return load_model(model_dir, "cpu")


@pytest.fixture(scope="module")
def live(loaded):
    from nanoseek.serve.server import create_app

    srv = LiveServer(create_app(*loaded, MODEL, max_batch_size=8, max_len=128))
    yield srv
    srv.close()
    assert not srv.app.state.runner._thread.is_alive()  # shutdown stops the engine thread


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def chat(client, user=USERS[1], **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": user}], **kw)


def assert_still_serving(client):
    assert chat(client, extra_body={"thinking": {"type": "disabled"}}).choices[0].message.content == ANSWER


# ---------------------------------------------------------------------------------------------- reasoning split
def test_reasoning_splitter_equals_parse_completion_under_any_chunking():
    pieces = ["a", "b c", " ", "\n", "<think>", END_THINK, "</", "<", "think", ">", "/", EOS, "<｜end", "  "]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        for thinking in (True, False):
            sp, parts, kinds = ReasoningSplitter(thinking), ["", ""], []
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 5))))
            for a, b in zip([0] + cuts, cuts + [len(text)]):
                for k, d in enumerate(sp.feed(text[a:b])):
                    parts[k] += d
                    kinds += [k] if d else []
            for k, d in enumerate(sp.finish()):
                parts[k] += d
                kinds += [k] if d else []
            assert tuple(parts) == parse_completion(text, thinking), text  # thinking off splits at </think> too
            assert kinds == sorted(kinds), text  # every reasoning delta comes before the first answer delta


# ---------------------------------------------------------------------------------------------- endpoints
def test_models_list(client, live):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].owned_by == "nanoseek"
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_stream_concatenates_to_the_non_streamed_text(client):
    kw = dict(model=MODEL, prompt="The answer", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    text = full.choices[0].text
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 20 and full.usage.total_tokens == 20 + full.usage.prompt_tokens
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == text and text.strip()
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_prompt_lists_and_n_give_prompt_major_choices(client, loaded):
    tok = loaded[1]
    kw = dict(model=MODEL, max_tokens=8, temperature=1.0, n=2, seed=7, extra_body={"ignore_eos": True})
    both = client.completions.create(prompt=["The cat", "1 2 3"], **kw)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.usage.prompt_tokens == len(tok.encode("The cat")) + len(tok.encode("1 2 3"))
    assert both.usage.completion_tokens == 4 * 8
    # seeded samples do not depend on their batch; token-id prompts equal their text
    alone = client.completions.create(prompt=[tok.encode("1 2 3")], **kw)
    assert [c.text for c in alone.choices] == [c.text for c in both.choices[2:]]


def test_completion_logprobs_cover_every_token(client):
    r = client.completions.create(model=MODEL, prompt="The cat", max_tokens=10, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == r.usage.completion_tokens == 10
    assert all(v <= 0 for v in lp.token_logprobs) and "".join(lp.tokens) == r.choices[0].text
    assert client.completions.create(model=MODEL, prompt="The cat", max_tokens=4).choices[0].logprobs is None


def test_echo_scores_the_prompt_like_a_full_forward(client, loaded):
    """lm-evaluation-harness's loglikelihood request: echo + logprobs + max_tokens 0 (and 1)."""
    import torch

    model, tok = loaded
    ids = tok.encode("The cat sat on the mat")
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    want = logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=3, temperature=0)
    c = r.choices[0]
    assert c.text == tok.decode(ids) and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp.tokens == [tok.decode([t]) for t in ids] and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-4)
    for pos, alts in enumerate(lp.top_logprobs[1:]):  # the 3 best next tokens, best first, as in the forward
        best = logp[pos].topk(3)
        assert list(alts.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
    is_greedy = [max(a, key=a.get) == t for a, t in zip(lp.top_logprobs[1:], lp.tokens[1:])]
    assert is_greedy == (logp.argmax(-1) == torch.tensor(ids[1:])).tolist()
    # with generation: the echoed prompt, then the completion, offsets continuing
    g = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, echo=True, logprobs=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    gl = g.choices[0].logprobs
    assert len(gl.tokens) == len(ids) + 3 and g.choices[0].text.startswith(tok.decode(ids))
    assert gl.token_logprobs[0] is None and gl.token_logprobs[1: len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    assert gl.text_offset == sorted(gl.text_offset) and gl.text_offset[len(ids)] == len(tok.decode(ids))
    assert all(len(a) == 2 for a in gl.top_logprobs[len(ids):])
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True, stream=True)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=ids, max_tokens=0)  # max_tokens 0 only with echo


def test_chat_top_logprobs_rank_the_alternatives(client):
    r = chat(client, logprobs=True, top_logprobs=3, max_tokens=6)
    content = r.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 for c in content)
    for c in content:  # greedy: the chosen token is the best alternative, with the same log-prob
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert [a.logprob for a in c.top_logprobs] == sorted((a.logprob for a in c.top_logprobs), reverse=True)
    stream = chat(client, logprobs=True, top_logprobs=2, max_tokens=6, stream=True)
    streamed = [c for ch in stream if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert all(len(c.top_logprobs) == 2 for c in streamed)


def test_chat_with_thinking_returns_reasoning_apart_from_content(client, loaded):
    r = chat(client)  # the server's default: thinking on
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert msg.content == ANSWER and msg.reasoning_content == REASON
    assert r.usage.completion_tokens == len(loaded[1].encode(REASON + END_THINK + ANSWER)) + 1  # + EOS
    on = chat(client, extra_body={"thinking": {"type": "enabled"}}).choices[0].message
    assert (on.content, on.reasoning_content) == (ANSWER, REASON)


@pytest.mark.parametrize("switch", [{"thinking": {"type": "disabled"}}, {"chat_template_kwargs": {"thinking": False}}])
def test_chat_without_thinking_has_no_reasoning_content(client, switch):
    r = chat(client, extra_body=switch)
    msg = r.choices[0].message
    assert msg.content == ANSWER and getattr(msg, "reasoning_content", None) is None
    assert r.usage.completion_tokens == r.usage.total_tokens - r.usage.prompt_tokens


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_stream_reassembles_to_the_non_streamed_message(client, thinking):
    kw = dict(extra_body={"thinking": {"type": "enabled" if thinking else "disabled"}})
    full = chat(client, **kw).choices[0].message
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    body = [c.choices[0] for c in chunks[:-1]]
    assert body[-1].finish_reason == "stop" and all(c.finish_reason is None for c in body[:-1])
    kinds, reasoning, content = [], "", ""
    for c in body:
        r, t = getattr(c.delta, "reasoning_content", None), c.delta.content
        reasoning, content = reasoning + (r or ""), content + (t or "")
        kinds += (["r"] if r else []) + (["c"] if t else [])
    assert content == full.content == ANSWER
    if thinking:
        assert reasoning == full.reasoning_content == REASON
        assert kinds.index("c") == kinds.count("r") > 1  # several reasoning deltas, all before the content
    else:
        assert reasoning == "" and "r" not in kinds


def test_chat_n_samples_and_max_tokens(client):
    r = chat(client, n=3, max_tokens=4, temperature=0.8, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 12
    r = chat(client, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------------------------------- errors
BAD_CHATS = [
    ("temperature", dict(temperature=-1)),
    ("n", dict(n=0)),
    ("top_p", dict(top_p=1.5)),
    ("max_tokens", dict(max_tokens=0)),
    ("messages", dict(messages=[{"role": "wizard", "content": "hi"}])),
    ("messages", dict(messages=[])),
    ("messages", dict(messages=[{"role": "user"}])),
    ("messages", dict(messages=[{"role": "user", "content": "hello " * 200}])),  # longer than max_len
    ("thinking", dict(extra_body={"thinking": {"type": "maybe"}})),
    ("stop", dict(stop=[""])),
]


@pytest.mark.parametrize("param,kw", BAD_CHATS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD_CHATS)])
def test_bad_chat_requests_get_400_and_the_server_keeps_serving(client, param, kw):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    args.update(kw)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert_still_serving(client)


def test_bad_completion_requests_get_400(client):
    with pytest.raises(openai.BadRequestError, match="context length") as e:
        client.completions.create(model=MODEL, prompt="hello " * 200)
    assert e.value.body["code"] == "context_length_exceeded"
    for kw in (dict(prompt=[[1, 2, 10_000]]), dict(prompt=""), dict(prompt="x", temperature=-1)):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, **kw)
    assert_still_serving(client)


def test_malformed_json_and_unknown_model(live, client):
    for data in (b'{"model": "nanoseek-test", "messages": [', b"[1, 2]", b"\xff\xfe"):
        status, body = live.post_raw("/chat/completions", data)
        assert status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
        assert_still_serving(client)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    status, body = live.post_raw("/no/such/route", b"{}")
    assert status == 404 and body["error"]["message"]
    assert_still_serving(client)


def test_api_key_is_required_when_set(loaded):
    from nanoseek.serve.server import create_app

    srv = LiveServer(create_app(*loaded, MODEL, api_key="sekrit", max_len=128))
    try:
        for key in ("wrong", "sekrit2"):
            with pytest.raises(openai.AuthenticationError) as e:
                chat(srv.client(api_key=key))
            assert e.value.body["type"] == "invalid_request_error" and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        status, body = srv.post_raw("/chat/completions", b"{}")  # no Authorization header at all
        assert status == 401 and "API key" in body["error"]["message"]
        good = srv.client("sekrit")
        assert [m.id for m in good.models.list().data] == [MODEL]
        assert chat(good).choices[0].message.content == ANSWER
    finally:
        srv.close()


# ---------------------------------------------------------------------------------------------- concurrency
def test_concurrent_clients_share_batches_and_match_one_at_a_time(live, client):
    runner, engine = live.app.state.runner, live.app.state.engine
    requests = [("completion", dict(prompt=p, max_tokens=24 + i, temperature=0, extra_body={"ignore_eos": True}))
                for i, p in enumerate(["The cat", "1 2 3", "Name", "It is"])]
    requests += [("completion", dict(prompt="The dog", max_tokens=24, temperature=1.0, seed=5,
                                     extra_body={"ignore_eos": True}))]
    requests += [("chat", dict(messages=[{"role": "user", "content": u}], temperature=0)) for u in USERS[2:4]]

    def call(kind, kw):
        c = live.client()
        if kind == "chat":
            m = c.chat.completions.create(model=MODEL, **kw).choices[0].message
            return m.reasoning_content, m.content
        return c.completions.create(model=MODEL, **kw).choices[0].text

    f0 = engine.num_forwards
    alone = [call(*r) for r in requests]
    sequential_forwards = engine.num_forwards - f0
    assert len(set(alone[:5])) == 5  # different requests, different texts: a mix-up would show

    runner.max_live, f0 = 0, engine.num_forwards
    results, errors = [None] * len(requests), []
    barrier = threading.Barrier(len(requests))

    def worker(i):
        try:
            barrier.wait()
            results[i] = call(*requests[i])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == alone
    assert runner.max_live >= 3  # sequences from different requests decoded in one batch
    assert engine.num_forwards - f0 < sequential_forwards


def test_client_disconnect_cancels_the_stream(live, client):
    engine = live.app.state.engine
    f0 = engine.num_forwards
    stream = client.completions.create(model=MODEL, prompt="The cat", max_tokens=120, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.time() + 10
    while engine.has_unfinished() and time.time() < deadline:
        time.sleep(0.01)
    assert not engine.has_unfinished() and engine.num_forwards - f0 < 110  # cut short, not run to 120 tokens
    assert_still_serving(client)


def test_an_engine_failure_fails_its_requests_and_the_server_recovers(live, client, monkeypatch):
    engine = live.app.state.engine
    real_step, failed = engine.step, []

    def flaky_step():
        if not failed:
            failed.append(1)
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    with pytest.raises(openai.InternalServerError, match="boom"):
        chat(client)
    assert_still_serving(client)
