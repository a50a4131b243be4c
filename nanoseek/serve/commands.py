"""The inference commands: `nanoseek generate` (batched), `nanoseek chat` (interactive, streaming) and
`nanoseek serve` (the OpenAI-compatible server). `register(subparsers)` adds them to the `nanoseek` CLI.

    nanoseek generate --model runs/nanoseek/sft/model --prompt "What is 2+3?" --n 2 --json
    nanoseek generate --model DIR --prompts-file prompts.jsonl --speculative
    nanoseek chat --model DIR --no-thinking
    nanoseek serve --model DIR --port 8000 --api-key secret
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

CHAT_COMMANDS = "/think, /nothink, /reset, /exit (or end of input)"


def load_model(path: str, device: str | None = None, quantize: str | None = None):
    """(model, tokenizer) from a Hugging Face model folder (DeepSeek or a dense student), in eval mode;
    quantize: the weight format to quantise to at load (nanoseek.quant.FORMATS)."""
    from ..tokenizer import Tokenizer
    from ..train.common import pick_device
    from ..train.evaluate import load_any_model

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: --model must be a Hugging Face model folder "
                                "(e.g. runs/nanoseek/sft/model)")
    tokenizer = Tokenizer.load(str(folder))
    model = load_any_model(str(folder), pick_device(device), quantize).eval()
    return model, tokenizer


def _context(model, max_len: int | None, need: int | None = None) -> int:
    """max_len, else what the run needs (capped by the model's positions), else min(positions, 4096)."""
    if max_len is not None:
        return max_len
    positions = model.config.max_position_embeddings
    return min(positions, need if need is not None else 4096)


# ---------------------------------------------------------------------------------------------- generate


def _read_prompts(args) -> list:
    """Prompts from --prompt and --prompts-file: strings, or message lists from JSONL "messages"."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        jsonl = path.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{"))
        for i, line in enumerate(lines, 1):
            if not jsonl:
                prompts.append(line)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
            p = rec.get("prompt", rec.get("messages")) if isinstance(rec, dict) else None
            if not isinstance(p, (str, list)):
                raise ValueError(f'{path}:{i}: each JSONL line needs a "prompt" string (or "messages" list)')
            prompts.append(p)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompts-file FILE")
    return prompts


def _encode(tokenizer, prompt, args) -> list[int]:
    if isinstance(prompt, list):
        if not args.chat:
            raise ValueError('a "messages" prompt needs the chat template: drop --no-chat')
        return tokenizer.apply_chat_template(prompt, thinking=args.thinking)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, thinking=args.thinking)
    return tokenizer.encode(prompt)


def _generation_defaults(args) -> None:
    """--temperature / --top-p left unset: the model folder's generation_config.json (as the server and
    transformers read it), else checkpoint.GENERATION_DEFAULTS."""
    from ..checkpoint import generation_defaults

    defaults = generation_defaults(args.model)
    for name in ("temperature", "top_p"):
        if getattr(args, name) is None:
            setattr(args, name, defaults.get(name, {"temperature": 0.6, "top_p": 0.95}[name]))


def _cut_at_stop(text: str, stops) -> str:
    hits = [text.find(s) for s in stops or [] if s in text]
    return text[: min(hits)] if hits else text


def _generate_greedy(args, model, tokenizer, ids, need: int) -> tuple[list[dict], int, bool, tuple]:
    """`generate --speculative MODE` (auto / on): greedy, speculative or plain as `greedy_generate` chooses.
    Returns (records, forwards, speculative chosen, (drafted, accepted, rounds))."""
    from ..engine import Engine, greedy_generate

    engine = Engine(model, tokenizer, max_batch_size=1 if args.speculative == "on" else args.max_batch_size,
                    max_len=_context(model, args.max_len, need), compile=args.compile)
    choice, outs = greedy_generate(engine, ids, args.max_tokens, args.speculative,
                                   stop_token_ids=[tokenizer.eos_id], max_len=args.max_len)
    print(choice.reason, file=sys.stderr if args.json else sys.stdout, flush=True)
    records = []
    for i, out in enumerate(outs):
        toks = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
        text = tokenizer.decode(toks, skip_special_tokens=True)
        cut = _cut_at_stop(text, args.stop)
        rec = dict(i=i, j=0, text=cut, finish_reason="stop" if cut != text else out.finish_reason,
                   tokens=len(out.token_ids))
        if choice.speculative:
            rec.update(acceptance_rate=round(out.acceptance_rate, 4),
                       tokens_per_forward=round(out.tokens_per_forward, 4))
        records.append(rec)
    if not choice.speculative:
        return records, engine.num_forwards, False, (0, 0, 0)
    stats = tuple(sum(getattr(o, f) for o in outs) for f in ("num_drafted", "num_accepted", "num_rounds"))
    return records, stats[2], True, stats


def cmd_generate(args) -> None:
    from ..engine import Engine, SamplingParams
    from ..tokenizer import parse_completion

    prompts = _read_prompts(args)
    _generation_defaults(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, n=args.n, seed=args.seed, stop=args.stop or None)
    if args.speculative != "off" and args.n != 1:
        raise ValueError(f"--speculative decodes greedily, one completion per prompt; got --n {args.n}")
    model, tokenizer = load_model(args.model, args.device, args.quantize)
    ids = [_encode(tokenizer, p, args) for p in prompts]
    split = args.chat and args.thinking  # the completion opens with reasoning (thinking off: only up to a </think>)
    need = max(len(x) for x in ids) + args.max_tokens + 1
    t0 = time.perf_counter()
    spec = False
    if args.speculative != "off":  # the probe of auto mode is counted in the time: it is part of the run
        records, forwards, spec, (drafted, accepted, rounds) = _generate_greedy(args, model, tokenizer, ids, need)
    else:
        records = []
        engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size,
                        max_len=_context(model, args.max_len, need), compile=args.compile)
        for i, out in enumerate(engine.generate(ids, params)):
            for j, c in enumerate(out.outputs):
                records.append(dict(i=i, j=j, text=c.text, finish_reason=c.finish_reason, tokens=len(c.token_ids)))
        forwards = engine.num_forwards
    seconds = time.perf_counter() - t0

    for r in records:
        reasoning, answer = parse_completion(r["text"], thinking=split) if args.chat else ("", r["text"])
        prompt = prompts[r["i"]]
        if args.json:
            rec = {"prompt": prompt, "index": r["j"], "text": r["text"], "reasoning": reasoning, "answer": answer,
                   "finish_reason": r["finish_reason"], "tokens": r["tokens"]}
            if spec:
                rec.update(acceptance_rate=r["acceptance_rate"], tokens_per_forward=r["tokens_per_forward"])
            print(json.dumps(rec, ensure_ascii=False))
            continue
        sample = f" sample {r['j'] + 1}/{args.n}" if args.n > 1 else ""
        shown = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
        print(f"[{r['i'] + 1}/{len(prompts)}{sample}] prompt: {shown}")
        if split or reasoning:  # thinking off, yet the model reasoned and wrote </think>: shown apart as well
            print(f"thinking: {reasoning}")
            print(f"answer: {answer}")
        else:
            print(f"completion: {answer if args.chat else r['text']}")
        extra = (f", acceptance rate {r['acceptance_rate']:.2f}, {r['tokens_per_forward']:.2f} tokens per forward"
                 if spec else "")
        print(f"({r['finish_reason']}, {r['tokens']} tokens{extra})\n")
    total = sum(r["tokens"] for r in records)
    summary = (f"{len(records)} completions, {total} tokens in {seconds:.2f} s ({total / max(seconds, 1e-9):.1f} "
               f"tokens/s, {forwards} forwards)")
    if spec:
        summary += (f"; speculative: acceptance rate {accepted / max(drafted, 1):.2f} ({accepted}/{drafted} drafts), "
                    f"{sum(r['tokens'] for r in records) / max(rounds, 1):.2f} tokens per forward")
    print(summary, file=sys.stderr if args.json else sys.stdout)


# ---------------------------------------------------------------------------------------------- chat


class _Printer:
    """Writes a streamed reply: a dimmed (on a terminal) `thinking: ...` block, then `assistant: ...`."""

    def __init__(self, out, color: bool):
        self.out, self.color = out, color
        self.in_thinking = self.in_answer = False

    def write(self, reasoning: str, answer: str) -> None:
        if reasoning:
            if not self.in_thinking:
                self.out.write(("\033[2m" if self.color else "") + "thinking: ")
                self.in_thinking = True
            self.out.write(reasoning)
        if answer:
            self.start_answer()
            self.out.write(answer)
        self.out.flush()

    def start_answer(self) -> None:
        if self.in_answer:
            return
        if self.in_thinking:
            self.out.write(("\033[0m" if self.color else "") + "\n")
        self.out.write("assistant: ")
        self.in_answer = True

    def end(self, note: str = "") -> None:
        self.start_answer()
        self.out.write((f" [{note}]" if note else "") + "\n")
        self.out.flush()


def _stream_reply(engine, ids, params, thinking: bool, out, worker: _EngineThread,
                  reasoning_out: list | None = None) -> tuple[str, str]:
    """Stream one reply to out; returns (answer, finish_reason), and appends the reasoning to reasoning_out if
    given. Ctrl-C cancels the reply ("abort")."""
    from .reasoning import ReasoningSplitter

    handle = engine.add_request(ids, params, stream=True)
    splitter, printer = ReasoningSplitter(thinking), _Printer(out, out.isatty())
    try:
        while True:
            try:
                ev = handle.events.get(timeout=0.1)  # short waits: Ctrl-C gets through
            except queue.Empty:
                worker.check()
                continue
            dr, da = splitter.feed(ev.text_delta)
            if ev.finished:
                fr, fa = splitter.finish()
                dr, da = dr + fr, da + fa
            printer.write(dr, da)
            if ev.finished:
                printer.end("max tokens reached" if ev.finish_reason == "length" else "")
                if reasoning_out is not None:
                    reasoning_out.append(splitter.reasoning)
                return splitter.answer, ev.finish_reason
    except KeyboardInterrupt:
        handle.cancel()
        handle.result(timeout=60)  # the engine thread drops it at its next step
        printer.end("interrupted")
        return splitter.answer, "abort"


def _read_line(stdin, interactive: bool) -> str | None:
    """The next input line without its newline; None at end of input. Ctrl-C at the prompt gives ''."""
    try:
        if interactive:
            return input("you> ")
        line = stdin.readline()
        return line.rstrip("\n") if line else None
    except EOFError:
        return None
    except KeyboardInterrupt:
        print()
        return ""


class _EngineThread(threading.Thread):
    """engine.run_forever in the background; check() re-raises what killed it, so the REPL never waits forever."""

    def __init__(self, engine):
        super().__init__(name="nanoseek-chat-engine", daemon=True)
        self.engine, self.stop, self.error = engine, threading.Event(), None

    def run(self) -> None:
        try:
            self.engine.run_forever(self.stop)
        except BaseException as e:
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the engine stopped: {type(self.error).__name__}: {self.error}") from self.error


def cmd_chat(args) -> None:
    from ..engine import Engine, SamplingParams

    model, tokenizer = load_model(args.model, args.device, args.quantize)
    _generation_defaults(args)
    engine = Engine(model, tokenizer, max_batch_size=1, max_len=_context(model, args.max_len), compile=args.compile)
    worker = _EngineThread(engine)
    worker.start()
    interactive = sys.stdin.isatty()
    thinking = args.thinking
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    tools = None
    if args.tools:
        from ..tools import tool_schemas

        tools = tool_schemas()
        tokenizer.apply_chat_template([{"role": "user", "content": ""}], tools=tools)  # ValueError: no tool tokens
    print(f"nanoseek chat: {args.model} (thinking {'on' if thinking else 'off'}; "
          f"{'tools: ' + ', '.join(t['function']['name'] for t in tools) + '; ' if tools else ''}{CHAT_COMMANDS})",
          flush=True)
    try:
        while True:
            line = _read_line(sys.stdin, interactive)
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                cmd = line.split()[0].lower()
                if cmd in ("/exit", "/quit"):
                    break
                if cmd in ("/think", "/nothink"):
                    thinking = cmd == "/think"
                    print(f"(thinking {'on' if thinking else 'off'})", flush=True)
                elif cmd == "/reset":
                    history = list(system)
                    print("(conversation cleared)", flush=True)
                else:
                    print(f"(unknown command {cmd}; commands: {CHAT_COMMANDS})", flush=True)
                continue
            if not interactive:
                print(f"you> {line}", flush=True)
            messages = history + [{"role": "user", "content": line}]
            for _ in range(MAX_TOOL_ROUNDS + 1):  # with --tools: call, run, go on, until a plain answer
                ids = tokenizer.apply_chat_template(messages, thinking=thinking, tools=tools)
                room = engine.max_len - len(ids)
                if room < 1:
                    print(f"(the conversation holds {len(ids)} tokens and no longer fits in {engine.max_len}; "
                          f"/reset to start over)", flush=True)
                    reason = "abort"
                    break
                params = SamplingParams(max_tokens=min(args.max_tokens, room), temperature=args.temperature,
                                        top_p=args.top_p, top_k=args.top_k, seed=args.seed)
                reasoning = []
                answer, reason = _stream_reply(engine, ids, params, thinking, sys.stdout, worker, reasoning)
                calls = _run_tool_calls(answer, tools) if tools and reason == "stop" else None
                if not calls:
                    break
                content, calls, outputs = calls
                messages = messages + [{"role": "assistant", "content": content, "tool_calls": calls,
                                        "reasoning_content": reasoning[0]}] + outputs  # kept this turn (V3.2)
            else:
                print(f"(stopped after {MAX_TOOL_ROUNDS} rounds of tool calls)", flush=True)
            if reason != "abort":  # the template drops this turn's reasoning from later prompts anyway
                history = messages + [{"role": "assistant", "content": answer}]
    finally:
        worker.stop.set()
        worker.join()


MAX_TOOL_ROUNDS = 8  # tool-call rounds per user message in `chat --tools`


def _run_tool_calls(answer: str, tools) -> tuple[str | None, list, list] | None:
    """The tool calls in a chat answer, run and shown: (content, tool_calls, tool messages), or None when the
    answer holds no well-formed call (it is then the reply, as the server would return it)."""
    from ..tools import call_tool
    from .tool_calls import parse_tool_calls

    content, calls = parse_tool_calls(answer, {t["function"]["name"] for t in tools})
    if not calls:
        return None
    outputs = []
    for c in calls:
        f = c["function"]
        print(f"tool call: {f['name']}({f['arguments']})", flush=True)
        result = call_tool(f["name"], f["arguments"])
        print("tool result: " + result.rstrip("\n"), flush=True)
        outputs.append({"role": "tool", "tool_call_id": c["id"], "content": result})
    return content, calls, outputs


# ---------------------------------------------------------------------------------------------- serve


def cmd_serve(args) -> None:
    import uvicorn

    from .server import create_app

    api_key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    from ..checkpoint import generation_defaults

    model, tokenizer = load_model(args.model, args.device, args.quantize)
    name = args.served_model_name or args.model
    app = create_app(model, tokenizer, name, api_key=api_key, max_batch_size=args.max_batch_size,
                     max_len=_context(model, args.max_len), thinking=args.thinking, compile=args.compile,
                     max_body_bytes=args.max_body_bytes, max_samples=args.max_samples,
                     generation_defaults=generation_defaults(args.model))
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key (set --api-key or NANOSEEK_API_KEY)",
              file=sys.stderr)
    print(f"serving `{name}` at http://{args.host}:{args.port}/v1 (batch {args.max_batch_size}, context "
          f"{app.state.engine.max_len} tokens, thinking {'on' if args.thinking else 'off'} by default"
          f"{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


# ---------------------------------------------------------------------------------------------- flags


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json, weights, tokenizer)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--quantize", default=None, choices=["fp32", "bf16", "int8", "int8-g128", "int4-g128", "fp8"],
                   help="weight-only quantisation at load (nanoseek.quant; a quantised folder loads as stored)")
    p.add_argument("--max-len", type=int, default=None,
                   help="context length per sequence, prompt + completion (default: what the run needs, at most "
                        "the model's max_position_embeddings and 4096)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (DeepSeek models; CPU needs a C++ compiler): the first "
                        "steps compile, 10-30 s, then a step takes about half the time")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"tokens to generate at most (default: {max_tokens})")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 = greedy (default: the model's generation_config.json, else 0.6)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass; 1 = off (default: the model's generation_config.json, else 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (sample i of n draws from a stream hashed from (seed, i, prompt))")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True,
                   help="open the reply with reasoning (<think>), as DeepSeek-V3.1's template (default: on)")
    p.add_argument("--system", default=None, help="system prompt")


def register(subparsers) -> None:
    """Add `generate`, `chat` and `serve` to the `nanoseek` command's subparsers."""
    s = subparsers.add_parser("generate", help="batched generation from prompts (chat template, thinking, MTP "
                                               "speculative decoding)")
    _model_args(s)
    s.add_argument("--prompt", action="extend", nargs="+", default=None, metavar="TEXT",
                   help="prompt(s); repeat the flag or give several")
    s.add_argument("--prompts-file", default=None, metavar="FILE",
                   help='one prompt per line, or JSONL with a "prompt" string (or "messages" list) per line')
    s.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap each prompt in the chat template as a user turn (default: on)")
    _sampling_args(s, max_tokens=1024, temperature=0.6)  # as chat: one default per idea
    s.add_argument("--n", type=int, default=1, help="completions per prompt (default: 1)")
    s.add_argument("--stop", nargs="+", default=None, metavar="TEXT", help="stop strings")
    s.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together (default: 16)")
    s.add_argument("--speculative", nargs="?", const="auto", default="off", choices=["auto", "on", "off"],
                   help="greedy decoding with MTP speculative decoding (one prompt at a time; sampling flags are "
                        "ignored): 'on', 'off' (the default without the flag), or 'auto' (the flag alone): time a "
                        "few plain and speculative steps on this model and batch first, decode speculatively only "
                        "when it is expected to be faster, and print the choice with its numbers; the greedy "
                        "tokens are the same either way. Reports the draft acceptance rate and tokens per forward")
    s.add_argument("--json", action="store_true",
                   help="one JSON object per completion: prompt, index, text, reasoning, answer, finish_reason, tokens")
    s.set_defaults(fn=cmd_generate)

    s = subparsers.add_parser("chat", help=f"interactive chat, streaming the reply ({CHAT_COMMANDS})")
    _model_args(s)
    _sampling_args(s, max_tokens=1024, temperature=0.6)
    s.add_argument("--tools", action="store_true",
                   help="let the model call the built-in tools (nanoseek/tools.py: calculator, python in a limited "
                        "subprocess); calls and results are shown. Needs a tokenizer with the tool tokens")
    s.set_defaults(fn=cmd_chat)

    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: the NANOSEEK_API_KEY environment variable; "
                        "none = open)")
    s.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together (default: 16)")
    s.add_argument("--served-model-name", default=None, help="the model id clients ask for (default: --model)")
    # the defaults are protocol.MAX_BODY_BYTES and MAX_SAMPLES, spelled out so `--help` does not import torch
    s.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body in bytes; a larger one gets a 413 (default: 1048576, 1 MiB)")
    s.add_argument("--max-samples", type=int, default=128,
                   help="most samples one request may ask for, prompts x n; more is a 400 (default: 128)")
    s.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True,
                   help="chat requests think unless they say otherwise (default: on)")
    s.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    s.set_defaults(fn=cmd_serve)
