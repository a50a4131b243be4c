"""The OpenAI wire format: request fields checked into engine arguments, responses and stream chunks.

Every check raises `APIError` with OpenAI's error body ({"error": {"message", "type", "param", "code"}})
naming the offending field, so the server answers 400 instead of failing inside the engine.
"""

from __future__ import annotations

import json

from ..engine import SamplingParams
from ..tokenizer import ROLES
from .reasoning import ReasoningSplitter

MAX_N = 128  # samples per prompt, as OpenAI caps n


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _short(v, limit: int = 200) -> str:
    """repr(v) cut to limit characters, for error messages that quote a request's value."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer_field(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise APIError(400, f"{name} must be an integer{rng}, got {_short(v)}", param=name)
    return v


def number_field(body: dict, name: str, default: float, lo: float, hi: float | None = None, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or (v <= lo if lo_open else v < lo) \
            or (hi is not None and v > hi):
        rng = f"in ({lo}, {hi}]" if lo_open else (f"in [{lo}, {hi}]" if hi is not None else f">= {lo}")
        raise APIError(400, f"{name} must be a number {rng}, got {_short(v)}", param=name)
    return float(v)


def bool_field(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"{name} must be a boolean, got {_short(v)}", param=name)
    return v


def _unsupported(body: dict) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported by this server (only 0)", param=name)
    for name in ("logit_bias", "tools", "functions", "suffix"):
        if body.get(name):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise APIError(400, "best_of is not supported by this server (use n)", param="best_of")


def sampling_params(body: dict, max_tokens_default: int, max_tokens_names=("max_tokens",), logprobs: bool = False,
                    top_logprobs: int = 0) -> SamplingParams:
    """SamplingParams from a request (OpenAI fields, plus vLLM's top_k, stop_token_ids and ignore_eos)."""
    _unsupported(body)
    max_tokens = max_tokens_default
    for name in max_tokens_names:
        max_tokens = integer_field(body, name, max_tokens, lo=1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"stop must be a non-empty string or a list of them, got {_short(stop)}", param="stop")
    stop_ids = body.get("stop_token_ids")  # vLLM extension
    if stop_ids is not None and (not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids)):
        raise APIError(400, f"stop_token_ids must be a list of integers, got {_short(stop_ids)}",
                       param="stop_token_ids")
    top_k = integer_field(body, "top_k", 0, lo=-1)  # vLLM extension; -1 or 0 = off
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=number_field(body, "temperature", 1.0, lo=0.0),
            top_p=number_field(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True), top_k=max(top_k, 0),
            n=integer_field(body, "n", 1, lo=1, hi=MAX_N), seed=integer_field(body, "seed", None), stop=stop or None,
            stop_token_ids=stop_ids, ignore_eos=bool_field(body, "ignore_eos", False), logprobs=logprobs,
            top_logprobs=top_logprobs)
    except ValueError as e:  # anything SamplingParams rejects that the checks above let through
        name = str(e).split(" ", 1)[0].removeprefix("SamplingParams.")
        raise APIError(400, str(e), param=name) from None


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages -> the tokenizer's {role, content}: text parts joined, `developer` read as `system`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, f"messages must be a non-empty list, got {_short(messages)}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object, got {_short(m)}", param="messages")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)} (or developer), got "
                                f"{_short(m.get('role'))}", param="messages")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts, got "
                                f"{_short(content)}",
                           param="messages")
        out.append({"role": role, "content": content})
    return out


def chat_thinking(body: dict, default: bool) -> bool:
    t = body.get("thinking")
    if t is not None:
        kind = t.get("type") if isinstance(t, dict) else None
        if kind not in ("enabled", "disabled"):
            raise APIError(400, f'thinking must be {{"type": "enabled"}} or {{"type": "disabled"}}, got {_short(t)}',
                           param="thinking")
        return kind == "enabled"
    kw = body.get("chat_template_kwargs")
    if kw is not None:
        if not isinstance(kw, dict):
            raise APIError(400, f"chat_template_kwargs must be an object, got {_short(kw)}",
                           param="chat_template_kwargs")
        for name in ("thinking", "enable_thinking"):
            if name in kw:
                if not isinstance(kw[name], bool):
                    raise APIError(400, f"chat_template_kwargs.{name} must be a boolean, got {_short(kw[name])}",
                                   param="chat_template_kwargs")
                return kw[name]
    return default


def stream_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError(400, f"stream_options must be an object, got {_short(opts)}", param="stream_options")
    return bool(opts and opts.get("include_usage"))


def sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def usage(prompts: list[list[int]], completion_tokens: int) -> dict:
    p = sum(len(x) for x in prompts)
    return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}


def split_reasoning(text: str, thinking: bool) -> tuple[str, str]:
    """The (reasoning, answer) a stream of `text` reassembles to."""
    sp = ReasoningSplitter(thinking)
    sp.feed(text)
    sp.finish()
    return sp.reasoning, sp.answer


def completion_prompts(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    """A prompt: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        out = [tokenizer.encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        out = [tokenizer.encode(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        out = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_int(t) for t in p)
                                                     for p in prompt):
        out = [list(p) for p in prompt]
    else:
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                            f"lists, got {_short(prompt)}", param="prompt")
    for ids in out:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}", param="prompt")
    return out


def completion_logprobs(token_ids, logprobs, tokenizer, tops=None, offset: int = 0) -> dict:
    """The legacy completions `logprobs` object. tops: per token, [(id, log-prob)] (the `logprobs=N`
    alternatives) or None (the echoed first prompt token has neither a log-prob nor alternatives)."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top = None if tops is None else [None if alts is None else {tokenizer.decode([i]): lp for i, lp in alts}
                                     for alts in tops]
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}


def merge_logprobs(a: dict, b: dict) -> dict:
    """Two completions `logprobs` objects one after the other (echo: the prompt's, then the completion's)."""
    top = None if a["top_logprobs"] is None and b["top_logprobs"] is None else \
        (a["top_logprobs"] or [None] * len(a["tokens"])) + (b["top_logprobs"] or [None] * len(b["tokens"]))
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "text_offset")} | {"top_logprobs": top}


def chat_logprobs(token_ids, logprobs, tokenizer, tops=None) -> dict:
    """The chat `logprobs` object; tops: per token, the `top_logprobs` alternatives [(id, log-prob)]."""
    content = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs)):
        s = tokenizer.decode([t])
        alts = []
        for j, alp in (tops[i] if tops is not None else []):
            a = tokenizer.decode([j])
            alts.append({"token": a, "logprob": alp, "bytes": list(a.encode("utf-8"))})
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": alts})
    return {"content": content}
