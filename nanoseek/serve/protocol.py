"""The OpenAI wire format: request fields checked into engine arguments, responses and stream chunks.

Every check raises `APIError` with OpenAI's error body ({"error": {"message", "type", "param", "code"}})
naming the offending field, so the server answers 400 instead of failing inside the engine.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch

from ..engine import SamplingParams
from ..engine.sampling import make_generator, sample
from ..tokenizer import ROLES
from .reasoning import ReasoningSplitter

MAX_N = 128  # samples per prompt, as OpenAI caps n
MAX_SAMPLES = 128  # default cap on samples per request: prompts x n (create_app(max_samples=...))
MAX_BODY_BYTES = 1 << 20  # default request body limit (create_app(max_body_bytes=...)); 413 above it
MAX_JSON_DEPTH = 64  # arrays/objects nested deeper than this are refused
MAX_STOP = 16  # stop strings per request (OpenAI: 4); each at most MAX_STOP_CHARS characters
MAX_STOP_CHARS = 256  # every step scans each stop string: a long one would slow the whole batch
MAX_STOP_TOKEN_IDS = 256
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1  # a signed 64-bit integer, as OpenAI and vLLM take it
SAMPLING_EPS = 1e-5  # a temperature below this is greedy (vLLM's _SAMPLING_EPS): logits / 1e-300 overflow
LOGPROB_FLOOR = -9999.0  # log-probs below it (-inf outside a top-k/top-p support) are sent as it, as vLLM does


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
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
            or (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        rng = f"in ({lo}, {hi}]" if lo_open else (f"in [{lo}, {hi}]" if hi is not None else f">= {lo} (and finite)")
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
    for name in ("logit_bias", "functions", "suffix"):
        if body.get(name):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise APIError(400, "best_of is not supported by this server (use n)", param="best_of")


def sampling_params(body: dict, max_tokens_default: int, vocab_size: int, max_len: int,
                    max_tokens_names=("max_tokens",), logprobs: bool = False, top_logprobs: int = 0,
                    defaults: dict | None = None) -> SamplingParams:
    """SamplingParams from a request (OpenAI fields, plus vLLM's top_k, min_p, min_tokens, repetition_penalty,
    stop_token_ids, ignore_eos, skip_special_tokens (default true) and include_stop_str_in_output). Every field is
    checked against the range the engine can use (vocab_size, max_len: the engine's), so what passes here cannot
    fail inside an engine step; `dry_run` then proves it on the real sampler. defaults: the temperature / top_p a
    request that names neither gets (the model's generation_config.json; else OpenAI's 1 and 1)."""
    defaults = defaults or {}
    _unsupported(body)
    max_tokens = max_tokens_default
    for name in max_tokens_names:
        max_tokens = integer_field(body, name, max_tokens, lo=1, hi=max_len)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"stop must be a non-empty string or a list of them, got {_short(stop)}", param="stop")
    if stop is not None and (len(stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stop)):
        raise APIError(400, f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters each, "
                            f"got {_short(stop)}", param="stop")
    stop_ids = body.get("stop_token_ids")  # vLLM extension
    if stop_ids is not None and (not isinstance(stop_ids, list) or len(stop_ids) > MAX_STOP_TOKEN_IDS
                                 or not all(_is_int(t) and 0 <= t < vocab_size for t in stop_ids)):
        raise APIError(400, f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids in "
                            f"[0, {vocab_size}), got {_short(stop_ids)}", param="stop_token_ids")
    top_k = integer_field(body, "top_k", 0, lo=-1, hi=vocab_size)  # vLLM extension; -1 or 0 = off
    temperature = number_field(body, "temperature", defaults.get("temperature", 1.0), lo=0.0)
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=0.0 if temperature < SAMPLING_EPS else temperature,
            top_p=number_field(body, "top_p", defaults.get("top_p", 1.0), lo=0.0, hi=1.0, lo_open=True),
            top_k=max(top_k, 0), min_p=number_field(body, "min_p", 0.0, lo=0.0, hi=1.0),
            min_tokens=integer_field(body, "min_tokens", 0, lo=0, hi=max_tokens),
            repetition_penalty=number_field(body, "repetition_penalty", 1.0, lo=0.0, hi=100.0,
                                            lo_open=True),
            skip_special_tokens=bool_field(body, "skip_special_tokens", True),
            include_stop_str_in_output=bool_field(body, "include_stop_str_in_output", False),
            n=integer_field(body, "n", 1, lo=1, hi=MAX_N), seed=integer_field(body, "seed", None, SEED_MIN, SEED_MAX),
            stop=stop or None, stop_token_ids=stop_ids, ignore_eos=bool_field(body, "ignore_eos", False),
            logprobs=logprobs, top_logprobs=top_logprobs)
    except ValueError as e:  # anything SamplingParams rejects that the checks above let through
        name = str(e).split(" ", 1)[0].removeprefix("SamplingParams.")
        raise APIError(400, str(e), param=name) from None


def with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    if params.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens {params.min_tokens} is more than the {max_tokens} tokens left in the context "
                            "after the prompt", param="min_tokens")
    return dataclasses.replace(params, max_tokens=max_tokens)


def check_context(prompt_len: int, body: dict, names, max_len: int) -> None:
    """A max_tokens that the prompt leaves no room for is a 400 naming the field (as vLLM), not a silent "length"."""
    for name in names:
        m = body.get(name)
        if m is not None and prompt_len + m > max_len:
            raise APIError(400, f"this model's maximum context length is {max_len} tokens; the request asks for "
                                f"{prompt_len + m} ({prompt_len} in the prompt, {name}={m}): lower {name}",
                           param=name, code="context_length_exceeded")


def dry_run(params: SamplingParams, vocab_size: int, sampler=sample) -> None:
    """Run the sampler once on a dummy row with these params: whatever a decode step would raise for them
    (a value torch cannot hold, a bad combination) raises here, before the request is queued. The server calls
    it on every request, and the engine thread calls it to find which request made a failed step fail."""
    g = None if params.greedy else make_generator(0)  # the engine's own kind of stream
    sampler(torch.zeros(1, vocab_size), [params], [g], return_support=params.return_sampling_mask,
            top_n=params.top_logprobs)


def check_samples(num_prompts: int, n: int, limit: int, param: str) -> None:
    if num_prompts * n > limit:
        raise APIError(400, f"this request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} samples; "
                            f"this server takes at most {limit} per request", param="n" if num_prompts == 1 else param)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict:
    """The request body: a JSON object, with strings that are valid Unicode, nested at most MAX_JSON_DEPTH deep."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)  # NaN / Infinity are not JSON
    except RecursionError:
        raise APIError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                       code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    _check_tree(body)
    return body


def _check_tree(body: dict) -> None:
    """Walk the parsed body (iteratively): refuse nesting deeper than MAX_JSON_DEPTH and strings that are not
    valid Unicode (a lone surrogate such as "\\ud800" parses, but cannot be encoded to UTF-8 or tokenised)."""
    stack = [(body, "", 1)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(400, f"{path or 'a key'} is not valid Unicode: {e.reason} "
                                    f"{_short(v[e.start:e.end])} at character {e.start}",
                               param=path.split(".")[0].split("[")[0] or None) from None
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise APIError(400, f"the request body is nested too deeply at {path} (at most {MAX_JSON_DEPTH} "
                                    "levels)", param=path.split(".")[0].split("[")[0] or None, code="invalid_json")
            if isinstance(v, dict):
                for k, x in v.items():
                    p = f"{path}.{k}" if path else str(k)
                    stack.append((k, p, depth))
                    stack.append((x, p, depth + 1))
            else:
                stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages -> the tokenizer's {role, content, [reasoning_content], [tool_calls]}: text parts joined,
    `developer` read as `system`. A tool message's tool_call_id, when given, must name a call of the assistant turn
    it answers (the template itself renders tool outputs in order, as DeepSeek's does)."""
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
        if content is None and role == "assistant" and not m.get("tool_calls"):
            content = ""
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts, got "
                                f"{_short(content)}",
                           param="messages")
        msg = {"role": role, "content": content}
        if role == "assistant" and isinstance(m.get("reasoning_content"), str):
            msg["reasoning_content"] = m["reasoning_content"]  # kept within the current user turn (V3.2)
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        for name, owner in (("tool_call_id", "tool"), ("tool_calls", "assistant")):
            if m.get(name) is not None and role != owner:
                raise APIError(400, f"messages[{i}].{name} is only valid on {owner} messages, got it on a {role} "
                                    "message", param="messages")
        if role == "tool" and m.get("tool_call_id") is not None:
            prev = next((x for x in reversed(messages[:i]) if x.get("role") != "tool"), {})
            ids = [c.get("id") for c in prev.get("tool_calls") or [] if isinstance(c, dict)]
            if m["tool_call_id"] not in ids:
                raise APIError(400, f"messages[{i}].tool_call_id {_short(m['tool_call_id'])} answers no tool call of "
                                    f"the assistant message before it (its ids: {_short(ids)})", param="messages")
        out.append(msg)
    return out


def chat_tools(body: dict, tokenizer) -> tuple[list | None, str]:
    """(tools, choice) of a chat request: choice is "auto", "none", "required" or a function name. tool_choice
    defaults to "auto" with tools, "none" without (OpenAI)."""
    tools = body.get("tools") or None
    choice = body.get("tool_choice")
    if tools is not None:
        names = [t["function"]["name"] for t in tools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise APIError(400, f"tools: each function name must be unique, got {_short(dup)} more than once",
                           param="tools")
        if not getattr(tokenizer, "has_tool_tokens", False):
            raise APIError(400, "tools need DeepSeek-V3.1's tool tokens, which this model's tokenizer lacks (it was "
                                "trained before nanoseek added them)", param="tools")
    if choice is None:
        return tools, "auto" if tools else "none"
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(400, 'tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                                f'{{"name": ...}}}}, got {_short(choice)}', param="tool_choice")
        choice = name
        if tools is None or name not in [t["function"]["name"] for t in tools]:
            raise APIError(400, f"tool_choice names the function {_short(name)}, which is not in tools",
                           param="tool_choice")
        return tools, name
    if choice not in ("auto", "none", "required"):
        raise APIError(400, f'tool_choice must be "auto", "none", "required" or a named function, got {_short(choice)}',
                       param="tool_choice")
    if choice != "none" and tools is None:
        raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
    return tools, choice


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
    """One server-sent event; a non-finite float that slipped through is sent as null (never `-Infinity`)."""
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return "data: " + text + "\n\n"


def _finite(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def usage(prompts: list[list[int]], completion_tokens: int) -> dict:
    p = sum(len(x) for x in prompts)
    return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}


def split_reasoning(text: str, thinking: bool) -> tuple[str, str]:
    """The (reasoning, answer) a stream of `text` reassembles to; the answer keeps its whitespace (as vLLM)."""
    sp = ReasoningSplitter(thinking, strip_answer=False)
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


def finite_logprob(lp: float | None) -> float | None:
    """lp, with -inf (a token outside a top-k / top-p support) and NaN sent as LOGPROB_FLOOR: JSON has no
    infinities, and OpenAI / vLLM clients expect a number."""
    return lp if lp is None or lp >= LOGPROB_FLOOR else LOGPROB_FLOOR


def completion_logprobs(token_ids, logprobs, tokenizer, tops=None, offset: int = 0, skip_special: bool = False
                        ) -> dict:
    """The legacy completions `logprobs` object. tops: per token, [(id, log-prob)] (the `logprobs=N`
    alternatives) or None (the echoed first prompt token has neither a log-prob nor alternatives). skip_special:
    a special token's string is "" (the request's skip_special_tokens), so the tokens still join to the text."""
    tokens = [tokenizer.decode([t], skip_special_tokens=True) if skip_special else tokenizer.decode([t])
              for t in token_ids]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top = None if tops is None else [None if alts is None else {tokenizer.decode([i]): finite_logprob(lp)
                                                                for i, lp in alts} for alts in tops]
    return {"tokens": tokens, "token_logprobs": [finite_logprob(lp) for lp in logprobs], "top_logprobs": top,
            "text_offset": offsets}


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
            alts.append({"token": a, "logprob": finite_logprob(alp), "bytes": list(a.encode("utf-8"))})
        content.append({"token": s, "logprob": finite_logprob(lp), "bytes": list(s.encode("utf-8")),
                        "top_logprobs": alts})
    return {"content": content}


# ---------------------------------------------------------------------------------------------- request models
# One declaration of every field each endpoint accepts: /docs and /openapi.json show it, and a field not declared
# here (response_format, tool_choice, min_p, ... or a typo) is a 400 naming it instead of being silently ignored.
# Types are checked strictly here; the ranges that depend on the model (vocabulary, context) are checked by
# sampling_params and the handlers, and fields typed Any take several shapes that those checks name precisely.

from typing import Any, Literal  # noqa: E402

from pydantic import BaseModel, ConfigDict, Field, ValidationError  # noqa: E402


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _SamplingRequest(_Strict):
    model: str | None = Field(None, description="the served model's id (optional)")
    stream: bool | None = Field(None, description="server-sent events ending with `data: [DONE]`")
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, description="1 to the context length")
    temperature: float | None = Field(None, description=">= 0; below 1e-5 greedy (default 1)")
    top_p: float | None = Field(None, description="in (0, 1] (default 1)")
    top_k: int | None = Field(None, description="vLLM: -1 or 0 off, else at most the vocabulary size")
    n: int | None = Field(None, description=f"samples per prompt, 1-{MAX_N}")
    seed: int | None = Field(None, description="a signed 64-bit integer")
    stop: Any = Field(None, description=f"a string or at most {MAX_STOP} strings of 1-{MAX_STOP_CHARS} characters")
    stop_token_ids: list[int] | None = Field(None, description="vLLM: token ids ending a sample")
    ignore_eos: bool | None = Field(None, description="vLLM: do not stop at the end-of-sentence token")
    min_p: float | None = Field(None, description="vLLM: in [0, 1]; drop tokens less likely than min_p x the top one")
    min_tokens: int | None = Field(None, description="vLLM: no end token or stop string before this many tokens")
    repetition_penalty: float | None = Field(None, description="vLLM / HF: > 0; > 1 discourages tokens already seen "
                                                               "in the prompt or completion (default 1 = off)")
    skip_special_tokens: bool | None = Field(None, description="vLLM: hide special tokens from the text (default "
                                                               "true; `</think>` and tool tags are not special)")
    include_stop_str_in_output: bool | None = Field(None, description="vLLM: keep the matched stop string in the "
                                                                      "text")
    user: str | None = Field(None, description="an end-user id (accepted, not used)")
    presence_penalty: float | None = Field(None, description="only 0")
    frequency_penalty: float | None = Field(None, description="only 0")
    logit_bias: dict | None = Field(None, description="not supported (only empty)")
    best_of: int | None = Field(None, description="only 1 or n")


class CompletionRequest(_SamplingRequest):
    prompt: Any = Field(..., description="text, token ids, or a list of either")
    logprobs: int | None = Field(None, description="0-20 alternatives per token")
    echo: bool | None = Field(None, description="prepend the prompt (with max_tokens 0: score it only)")
    suffix: str | None = Field(None, description="not supported")


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(..., description="the arguments as a JSON string")


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, description="accepted, not used")
    reasoning_content: str | None = Field(None, description="kept (thinking) on the assistant turns after the last "
                                                            "user message (DeepSeek-V3.2), dropped on earlier ones")
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant turn's calls")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")


class FunctionSpec(_Strict):
    name: str = Field(..., min_length=1)
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON Schema object")
    strict: bool | None = Field(None, description="accepted, not enforced")


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class Thinking(_Strict):
    type: Literal["enabled", "disabled"]


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., description="system / developer / user / assistant turns")
    max_completion_tokens: int | None = Field(None, description="as max_tokens")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, description="0-20, with logprobs")
    thinking: Any = Field(None, description='DeepSeek: {"type": "enabled" | "disabled"}')
    chat_template_kwargs: Any = Field(None, description='vLLM: {"thinking": bool} or {"enable_thinking": bool}')
    tools: list[ToolSpec] | None = Field(None, description="functions the model may call (DeepSeek-V3.1 format)")
    tool_choice: Any = Field(None, description='"auto" | "none" | "required" | {"type": "function", "function": '
                                               '{"name": ...}}')
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call (generation stops after it)")
    functions: list | None = Field(None, description="not supported (only empty)")
    echo: bool | None = Field(None, description="not supported")


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = Field(None, description="text, encoded as /v1/completions encodes it")
    messages: list[ChatMessage] | None = Field(None, description="a chat, rendered as /v1/chat/completions does")
    add_generation_prompt: bool | None = Field(None, description="with messages: end with the assistant's opening "
                                                                 "(default true)")
    thinking: Any = Field(None, description='with messages: {"type": "enabled" | "disabled"}')
    chat_template_kwargs: Any = Field(None, description='with messages: {"thinking": bool}')
    tools: list[ToolSpec] | None = None
    tool_choice: Any = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(..., description="token ids")


def check_fields(model: type[BaseModel], body: dict) -> None:
    """Refuse a body that `model` does not declare (an unknown or unsupported field, a wrong type), naming the
    field and its value."""
    try:
        model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [x for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x in ("str", "list")))]
        path = "".join(f"[{x}]" if isinstance(x, int) else (f".{x}" if i else str(x)) for i, x in enumerate(loc))
        param = str(loc[0]) if loc else None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"{path} is not supported by this server (unknown field); got {_short(err['input'])}",
                           param=param, code="unsupported_field") from None
        raise APIError(400, f"{path}: {err['msg']}, got {_short(err['input'])}", param=param) from None


def openapi_body(model: type[BaseModel]) -> dict:
    """The `openapi_extra` that shows `model` as the endpoint's JSON body in /docs (the body itself is read,
    limited and parsed by the server, off the event loop)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(v):
        if isinstance(v, dict):
            if "$ref" in v:
                return inline(defs[v["$ref"].rsplit("/", 1)[1]])
            return {k: inline(x) for k, x in v.items()}
        return [inline(x) for x in v] if isinstance(v, list) else v

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}
