"""`nanoseek generate`, `nanoseek chat` and `nanoseek serve`, run in-process through nanoseek.cli.main on a
micro DeepSeek trained for a few seconds to answer the chat prompts USERS with REASON</think>ANSWER (thinking)
or ANSWER (not thinking). test_serve.py serves the same model."""

from __future__ import annotations

import io
import json
import queue
import shutil
import sys
from pathlib import Path

import pytest
import torch

from nanoseek import cli
from nanoseek.serve import commands

REASON, ANSWER = "Let me see.", "It is 5."
USERS = ["hi", "What is 2+3?", "Tell me a story.", "How are you?", "Name a color.", "ok", "Count to three.", "Why?"]
MODEL = "nanoseek-test"


def build_chat_model(folder: Path) -> str:
    """A micro DeepSeek (with an MTP module) that learned the canned chat reply; built once per session."""
    if (folder / "model.safetensors").is_file():
        return str(folder)
    from oracle import overfit_and_save

    from nanoseek import DeepSeekModel, ModelConfig
    from nanoseek.data.corpus import embedded_corpus
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(embedded_corpus(200), vocab_size=400)
    cfg = ModelConfig.from_preset(
        "tiny", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, index_n_heads=4, index_head_dim=16, max_position_embeddings=512)
    torch.manual_seed(0)
    model = DeepSeekModel(cfg)
    seqs = []
    for i, u in enumerate(USERS):
        for thinking in (True, False):
            msgs = [{"role": "user", "content": u},
                    {"role": "assistant", "content": ANSWER, "reasoning_content": REASON}]
            seqs.append(tok.encode_chat_with_mask(msgs, thinking=thinking))
            if (i + thinking) % 2:  # some two-turn conversations too, as chat sends
                msgs = [{"role": "user", "content": USERS[i - 1]}, {"role": "assistant", "content": ANSWER}] + msgs
                seqs.append(tok.encode_chat_with_mask(msgs, thinking=thinking))
    return overfit_and_save(model, tok, seqs, 80, folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_chat_model(tmp_path_factory.getbasetemp() / "serve_chat_model")


@pytest.fixture
def run(monkeypatch, capsys):
    """run(*argv, stdin=None) -> (exit code, stdout, stderr) of `nanoseek ...` with the commands registered."""
    if commands.register not in cli._EXTRA_COMMANDS:
        monkeypatch.setattr(cli, "_EXTRA_COMMANDS", [*cli._EXTRA_COMMANDS, commands.register])

    def run(*argv, stdin=None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_generate_prints_reasoning_and_answer_apart(run, model_dir):
    code, out, _ = run("generate", "--model", model_dir, "--prompt", USERS[0], USERS[1], "--temperature", 0,
                       "--max-tokens", 40)
    assert code == 0
    assert out.count(f"thinking: {REASON}\nanswer: {ANSWER}\n") == 2
    assert f"[2/2] prompt: {USERS[1]}" in out and "2 completions" in out
    code, out, _ = run("generate", "--model", model_dir, "--prompt", USERS[2], "--no-thinking", "--temperature", 0)
    assert code == 0 and f"completion: {ANSWER}\n" in out and "thinking:" not in out


def test_generate_without_thinking_keeps_reasoning_out_of_the_answer(run, model_dir, monkeypatch):
    from types import SimpleNamespace

    from nanoseek.engine import Engine

    def reasons_anyway(self, prompts, params=None, callback=None):  # thinking off, yet the model reasons
        text = f"{REASON}</think>{ANSWER}"
        return [SimpleNamespace(outputs=[SimpleNamespace(text=text, finish_reason="stop", token_ids=[1, 2])])
                for _ in prompts]

    monkeypatch.setattr(Engine, "generate", reasons_anyway)
    code, out, _ = run("generate", "--model", model_dir, "--prompt", USERS[2], "--no-thinking")
    assert code == 0 and f"thinking: {REASON}\nanswer: {ANSWER}\n" in out and "</think>" not in out
    code, out, _ = run("generate", "--model", model_dir, "--prompt", USERS[2], "--no-thinking", "--json")
    rec = json.loads(out)
    assert (rec["reasoning"], rec["answer"]) == (REASON, ANSWER)


def test_chat_without_thinking_streams_reasoning_apart(monkeypatch):
    from types import SimpleNamespace

    from nanoseek.serve.protocol import split_reasoning

    pieces = [REASON[:4], REASON[4:] + "</th", "ink> ", ANSWER[:3], ANSWER[3:]]

    class Engine:
        def add_request(self, ids, params, stream):
            q = queue.Queue()
            for i, p in enumerate(pieces):
                q.put(SimpleNamespace(text_delta=p, finished=i == len(pieces) - 1, finish_reason="stop"))
            return SimpleNamespace(events=q)

    out = io.StringIO()
    answer, reason = commands._stream_reply(Engine(), [1], None, False, out, SimpleNamespace(check=lambda: None))
    assert (answer, reason) == (ANSWER, "stop")
    assert out.getvalue() == f"thinking: {REASON}\nassistant: {ANSWER}\n"
    # the server's split (non-streamed replies) is the same; a model that answers directly keeps its answer
    assert split_reasoning("".join(pieces), False) == (REASON, " " + ANSWER)  # the server keeps content's whitespace
    assert split_reasoning(ANSWER, False) == ("", ANSWER)


def test_generate_json_lines_from_a_prompts_file(run, model_dir, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": u}) for u in USERS[:2]) + "\n")
    code, out, err = run("generate", "--model", model_dir, "--prompts-file", f, "--json", "--n", 2,
                         "--temperature", 0.5, "--seed", 3, "--max-tokens", 40)
    assert code == 0 and "4 completions" in err  # the summary stays off stdout
    recs = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt"], r["index"]) for r in recs] == [(USERS[0], 0), (USERS[0], 1), (USERS[1], 0), (USERS[1], 1)]
    for r in recs:
        assert {"prompt", "text", "reasoning", "answer", "finish_reason", "tokens"} <= set(r)
        assert r["finish_reason"] in ("stop", "length") and r["tokens"] > 0
        if "</think>" in r["text"]:
            assert r["text"].startswith(r["reasoning"]) and r["text"].endswith(r["answer"])
    plain = tmp_path / "prompts.txt"
    plain.write_text(f"{USERS[3]}\n\n{USERS[4]}\n")
    code, out, _ = run("generate", "--model", model_dir, "--prompts-file", plain, "--json", "--temperature", 0)
    recs = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["prompt"] for r in recs] == USERS[3:5]
    assert all((r["reasoning"], r["answer"]) == (REASON, ANSWER) for r in recs)


def test_generate_speculative_reports_acceptance_and_matches_greedy(run, model_dir):
    argv = ("generate", "--model", model_dir, "--prompt", "The cat", "--no-chat", "--max-tokens", 12, "--json")
    code, out, err = run(*argv, "--speculative", "on")
    assert code == 0 and "acceptance rate" in err and "tokens per forward" in err
    assert "speculative decoding: on (as asked)" in err
    spec = json.loads(out)
    assert 0.0 <= spec["acceptance_rate"] <= 1.0 and spec["tokens_per_forward"] >= 1.0
    _, out, _ = run(*argv, "--temperature", 0)
    assert spec["text"] == json.loads(out)["text"]  # speculative decoding is exactly greedy
    code, _, err = run("generate", "--model", model_dir, "--prompt", "x", "--speculative", "--n", 2)
    assert code == 2 and "--speculative" in err


@pytest.mark.parametrize("faster", ["speculative", "plain"])
def test_generate_speculative_auto_follows_the_measurement(run, model_dir, monkeypatch, faster):
    """`--speculative` alone is auto: the probe's numbers decide, the line says which and why, and the greedy
    text is the same as plain greedy decoding's either way (sampling flags and the folder's temperature are
    ignored)."""
    from nanoseek.engine import DecodeProbe
    from nanoseek.engine import speculative as spec_mod

    measured = DecodeProbe(2, 0.010, 0.004 if faster == "speculative" else 0.040, 10, 5, 1, 6, 6)
    monkeypatch.setattr(spec_mod, "probe_decode", lambda engine, prompts: measured)
    argv = ("generate", "--model", model_dir, "--prompt", USERS[1], USERS[2], "--max-tokens", 16, "--json")
    code, out, err = run(*argv, "--speculative")
    assert code == 0
    want = "on" if faster == "speculative" else "off"
    line = next(ln for ln in err.splitlines() if ln.startswith("speculative decoding:"))
    # 1.5 tokens per round of 4 ms (375 tok/s) or 40 ms (37.5 tok/s) against 2 rows per 10 ms step (200 tok/s)
    assert f": {want} (auto)" in line and "200.0 tokens/s" in line and "acceptance 0.50" in line
    assert ("375.0 tokens/s" in line and "1.88x" in line) if want == "on" else ("37.5 tokens/s" in line)
    recs = [json.loads(x) for x in out.splitlines()]
    assert all(("acceptance_rate" in r) == (want == "on") for r in recs)
    _, plain, _ = run(*argv, "--temperature", 0)
    assert [r["text"] for r in recs] == [json.loads(x)["text"] for x in plain.splitlines()]


def test_generate_speculative_auto_measures_for_real(run, model_dir):
    code, out, _ = run("generate", "--model", model_dir, "--prompt", USERS[1], "--max-tokens", 8, "--speculative",
                       "--temperature", 0)
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("speculative decoding:"))
    assert "(auto)" in line and "tokens/s" in line and "ms a step" in line


def test_chat_with_piped_input(run, model_dir):
    stdin = f"{USERS[0]}\n/nothink\n{USERS[1]}\n/bogus\n/exit\nnever read\n"
    code, out, _ = run("chat", "--model", model_dir, "--temperature", 0, "--max-tokens", 40, stdin=stdin)
    assert code == 0
    assert out.count(f"assistant: {ANSWER}\n") == 2  # both turns answered (the second with history)
    assert out.count(f"thinking: {REASON}") == 1 and "(thinking off)" in out and "unknown command" in out
    assert out.index(f"you> {USERS[0]}") < out.index("thinking:") < out.index(f"you> {USERS[1]}")
    assert "never read" not in out
    code, out, _ = run("chat", "--model", model_dir, "--temperature", 0, stdin=f"{USERS[2]}\n/reset\n")  # EOF ends
    assert code == 0 and "(conversation cleared)" in out and f"assistant: {ANSWER}" in out


def test_chat_ctrl_c_cancels_the_reply_not_the_session(run, model_dir, monkeypatch):
    from nanoseek.engine import Engine

    real_add, calls = Engine.add_request, []

    class InterruptedQueue(queue.Queue):
        def get(self, *a, **kw):
            raise KeyboardInterrupt  # the user hits Ctrl-C while the first reply streams

    def add_request(self, *a, **kw):
        handle = real_add(self, *a, **kw)
        calls.append(handle)
        if len(calls) == 1:
            handle.events = InterruptedQueue()
        return handle

    monkeypatch.setattr(Engine, "add_request", add_request)
    code, out, _ = run("chat", "--model", model_dir, "--temperature", 0, "--max-tokens", 40,
                       stdin=f"{USERS[0]}\n{USERS[1]}\n")
    assert code == 0 and "[interrupted]" in out and out.count(f"assistant: {ANSWER}\n") == 1
    assert calls[0].result(timeout=0).outputs[0].finish_reason == "abort"


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_bad_model_path_is_a_clear_error(run, tmp_path, command):
    extra = ["--prompt", "hi"] if command == "generate" else []
    code, out, err = run(command, "--model", tmp_path / "missing", *extra)
    assert code == 2 and "model folder not found" in err and "missing" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(command, "--model", tmp_path / "empty", *extra)
    assert code == 2 and "config.json" in err


def test_serve_builds_the_app_on_localhost_with_the_env_api_key(run, model_dir, monkeypatch):
    import openai
    import uvicorn
    pytest.importorskip("fastapi")
    from test_serve import LiveServer

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("NANOSEEK_API_KEY", "from-env")
    code, out, _ = run("serve", "--model", model_dir, "--served-model-name", MODEL, "--max-len", 128)
    assert code == 0 and seen["host"] == "127.0.0.1" and seen["port"] == 8000 and "API key required" in out
    srv = LiveServer(seen["app"])
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client().models.list()
        c = srv.client("from-env")
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": USERS[0]}], temperature=0)
        assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (REASON, ANSWER)
    finally:
        srv.close()


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_generate_with_compile_gives_the_same_greedy_text(run, model_dir):
    argv = ("generate", "--model", model_dir, "--prompt", USERS[0], USERS[1], "--temperature", 0, "--max-tokens", 40,
            "--json")
    code, out, _ = run(*argv)
    code_c, out_c, _ = run(*argv, "--compile")
    assert code == code_c == 0 and out_c == out


def test_serve_and_chat_take_compile(run, model_dir, monkeypatch):
    import uvicorn
    pytest.importorskip("fastapi")

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    for flags, want in (([], False), (["--compile"], True)):
        assert run("serve", "--model", model_dir, "--max-len", 64, *flags)[0] == 0
        assert seen["app"].state.engine.compile is want and seen["app"].state.engine.fast is not None
