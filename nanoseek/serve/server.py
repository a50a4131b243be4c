"""OpenAI-compatible HTTP server over one continuous-batching Engine.

One Engine, driven by one background thread (`EngineRunner`), serves every request: handlers enqueue
with `Engine.add_request` and await their events through an asyncio.Queue fed from the engine thread
(`loop.call_soon_threadsafe`), so concurrent requests decode in the same batches and the event loop never
blocks on the model.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent
events ending with `data: [DONE]`), GET /health, GET /version, GET /metrics, POST /tokenize, POST /detokenize. Chat thinking follows DeepSeek's API: the message's
`content` is the answer and `reasoning_content` the chain of thought (only when thinking). Thinking is
chosen per request by `{"thinking": {"type": "enabled"|"disabled"}}` (DeepSeek) or
`{"chat_template_kwargs": {"thinking": bool}}` (vLLM), else by the server default.

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request
(malformed JSON, an invalid field, a prompt that fills the context), 401 for a missing or wrong API key,
404 for an unknown model or route, 413 for a body over `max_body_bytes`.

Containment: a request is checked whole (every field against the range the engine can use, then `dry_run` on
the real sampler, the sample cap, the context) in a worker thread before any of it is queued; tokenisation and
response building also run off the event loop. A client that disconnects cancels its samples (streaming: when
the stream is closed; non-streaming: polled every DISCONNECT_POLL_S). If an engine step raises anyway, the
engine leaves it retryable and `EngineRunner._contain` fails only the requests whose parameters make the sampler
raise on their own; only a failure no request explains fails everything in flight.

Request fields are checked in protocol.py, the reasoning/answer split of a stream in reasoning.py.

Tools (DeepSeek-V3.1's format, tool_calls.py): `tools` go into the prompt through the chat template, and a
completion's tool-calls block comes back as OpenAI `tool_calls` (finish_reason "tool_calls"), streamed as one delta
per call once the block is closed; a malformed block is returned as content. Generation stops at
`<｜tool▁calls▁end｜>` (and, with `parallel_tool_calls: false`, at the first `<｜tool▁call▁end｜>`). `tool_choice`
"required" or a named function is enforced by ending the prompt with the opened block (and the name): the call is
certain, and with thinking on its reasoning is empty; "none" renders no tools and parses nothing.

Log-probs: `logprobs` (completions: 0-20 alternatives; chat: `logprobs` + `top_logprobs` 0-20) give the
sampled token's log-prob and the top alternatives; for temperature > 0 under the processed sampling
distribution (see engine/sampling.py), for greedy under the raw one. Completions take `echo` (the prompt's
text and, with `logprobs`, its tokens' log-probs under the raw distribution, the first one null), and
`echo` with `max_tokens: 0` scores the prompt without generating: what lm-evaluation-harness's
`local-completions` loglikelihood requests send.

vLLM conventions: `reasoning` beside `reasoning_content` (stream deltas too); `content` as generated, whitespace
kept; skip_special_tokens (default true), include_stop_str_in_output, min_p, min_tokens, repetition_penalty; a
max_tokens that the prompt leaves no room for is a 400 naming it; /metrics (Prometheus, metrics.py), /tokenize,
/detokenize, /version; defaults for temperature / top_p from the model's generation_config.json.

Simplifications: no legacy `functions`, presence / frequency penalties, logit_bias or suffix, no echo when
streaming or in chat, no continuation of a final assistant message (asking for them is a 400).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, RequestHandle, SamplingParams, StreamEvent
from ..engine import engine as _engine_module
from ..engine.sampling import MAX_TOP_LOGPROBS
from .protocol import (
    MAX_BODY_BYTES,
    MAX_SAMPLES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bool_field,
    chat_logprobs,
    chat_messages,
    chat_thinking,
    chat_tools,
    check_fields,
    check_context,
    check_samples,
    completion_logprobs,
    completion_prompts,
    dry_run,
    integer_field,
    merge_logprobs,
    openapi_body,
    parse_json,
    sampling_params,
    split_reasoning,
    sse,
    stream_usage,
    usage,
    with_max_tokens,
)
from .. import __version__
from .metrics import Metrics, MetricsMiddleware
from .reasoning import ReasoningSplitter
from .tool_calls import ToolCallStreamer, forced_prefix, parse_tool_calls
from ..tokenizer import TOOL_CALL_END, TOOL_CALLS_END

log = logging.getLogger("nanoseek.serve")
SSE_HEADERS = {"Cache-Control": "no-cache"}


class EngineFailure:
    """Sent to a request in flight that an engine step failed on (the engine thread then carries on)."""

    def __init__(self, message: str):
        self.message = message


DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks whether its client is still there


class EngineRunner:
    """Drives one Engine from a background thread; `submit` routes each request's events to a sink."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._inflight: dict[int, list] = {}  # key -> [handle or None, sink]
        self._next_key = 0
        self.max_live = 0  # most sequences holding a cache row at once (> 1: requests shared a batch)
        self.num_requests = 0
        self.prompt_tokens = 0  # for /metrics
        self.generation_tokens = 0

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all("the server is shutting down")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.engine.run_forever(self._stop)
            except Exception as e:  # keep serving: fail the request(s) that made the step fail, retry the rest
                log.exception("engine step failed")
                self._contain(f"engine error: {type(e).__name__}: {e}")
                self._stop.wait(0.01)  # no hot loop if something fails at every step

    def _contain(self, message: str) -> None:
        """After a failed engine step: fail only the requests whose parameters make the sampler raise on their
        own (dry_run with the engine's sampler), and let the others carry on. The engine leaves a failed step
        retryable (a row that got no token gives back the step's position, a group that could not be admitted
        goes back to the queue), so the next step redoes it without them. When no single request explains the
        failure (a model or device fault), every request in flight fails, as the step's state cannot be trusted."""
        with self._lock:
            items = list(self._inflight.items())
        sampler = _engine_module.sample  # the engine's own binding (a test may wrap it)
        culprits = []
        for key, (_, _, params) in items:
            try:
                dry_run(params, self.engine.model.config.vocab_size, sampler)
            except Exception:
                culprits.append(key)
        if not culprits:
            self._fail_all(message)
            return
        for key in culprits:
            self._fail(key, message + " (this request's parameters; the other requests carry on)")

    def _fail(self, key: int, message: str) -> None:
        with self._lock:
            entry = self._inflight.pop(key, None)
        if entry is not None:
            if entry[0] is not None:
                entry[0].cancel()
            _call(entry[1], EngineFailure(message))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            entries, self._inflight = list(self._inflight.values()), {}
        for handle, sink, _ in entries:
            if handle is not None:
                handle.cancel()
            _call(sink, EngineFailure(message))

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               sink: Callable[[StreamEvent | EngineFailure], None]) -> RequestHandle:
        """Queue a request; sink gets its StreamEvents on the engine thread (it must not block)."""
        self.start()
        with self._lock:
            key, self._next_key = self._next_key, self._next_key + 1
            entry = self._inflight[key] = [None, sink, params]
        left = [params.n]

        def on_event(ev: StreamEvent) -> None:  # runs on the engine thread, inside step()
            # rows in use right now; a sequence that just finished has already given its row back
            live = sum(s is not None for s in self.engine.slots) + (ev.finished and ev.finish_reason != "abort")
            self.max_live = max(self.max_live, live)
            self.generation_tokens += ev.token_id >= 0
            if ev.finished:
                left[0] -= 1
                if left[0] == 0:
                    with self._lock:
                        self._inflight.pop(key, None)
            _call(sink, ev)

        try:
            entry[0] = handle = self.engine.add_request(prompt_ids, params, stream=False, callback=on_event)
        except BaseException:
            with self._lock:
                self._inflight.pop(key, None)
            raise
        self.num_requests += 1
        self.prompt_tokens += len(prompt_ids)
        return handle


def _call(sink, ev) -> None:
    try:
        sink(ev)
    except Exception:  # an exception here would leave the engine's step half done
        log.exception("a request's event sink failed")


# ---------------------------------------------------------------------------------------------- generation


class _Generation:
    """Some prompts x n samples in flight; `events()` yields (prompt index, StreamEvent) until all finish."""

    def __init__(self, runner: EngineRunner, prompts: list[list[int]], params: SamplingParams, param: str):
        """Queue every prompt x n sample. The request was fully checked before (one policy: sampling_params,
        dry_run, the length and sample caps), so a refusal here is an engine invariant, and what was queued is
        cancelled."""
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list[RequestHandle] = []
        self.remaining = len(prompts) * params.n
        try:
            for i, ids in enumerate(prompts):
                self.handles.append(runner.submit(ids, params, self._sink(loop, i)))
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e), param=param) from None
        except BaseException:
            self.cancel()
            raise

    def _sink(self, loop, i: int):
        return lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))

    async def events(self):
        while self.remaining:
            i, ev = await self.queue.get()
            if isinstance(ev, EngineFailure):
                self.remaining = 0
                raise APIError(500, ev.message, type="server_error")
            self.remaining -= ev.finished
            yield i, ev

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done:
                h.cancel()

    async def drain(self, request: Request | None = None) -> None:
        """Wait until every sample finished (non-streaming requests). A client that goes away meanwhile (polled
        every DISCONNECT_POLL_S) cancels the generation; anything that ends the wait cancels what is left."""
        async def consume():
            async for _ in self.events():
                pass

        task = asyncio.ensure_future(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    task.result()
                    return
                if request is not None and await request.is_disconnected():
                    raise APIError(499, "the client closed the request", code="client_closed_request")
        finally:
            self.cancel()
            if not task.done():
                task.cancel()

    def sse_response(self, chunks) -> StreamingResponse:
        """Stream the async iterator `chunks` (SSE lines) then [DONE]; an engine failure becomes an error event,
        and a client that goes away cancels the generation."""
        async def body():
            try:
                async for c in chunks:
                    yield c
            except APIError as e:
                yield sse(e.body())
            finally:
                self.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


def create_app(model, tokenizer, model_name: str, api_key: str | None = None, max_batch_size: int = 16,
               max_len: int | None = None, thinking: bool = True, compile: bool = False,
               max_body_bytes: int = MAX_BODY_BYTES, max_samples: int = MAX_SAMPLES,
               generation_defaults: dict | None = None) -> FastAPI:
    """The FastAPI app serving `model` under `model_name`. thinking: the chat default when a request says
    nothing; compile: Engine(compile=True); max_body_bytes: the largest request body (413 above it);
    max_samples: the most samples one request may ask for (prompts x n; 400 above it); generation_defaults: the
    temperature / top_p of a request that names neither (the model folder's generation_config.json, see
    checkpoint.generation_defaults; else OpenAI's 1 and 1). The engine thread starts with the app (lifespan) or at
    the first request, and stops with it. With an api_key, /docs and /openapi.json need it too."""
    if max_body_bytes < 1 or max_samples < 1:
        raise ValueError(f"max_body_bytes and max_samples must be >= 1, got {max_body_bytes} and {max_samples}")
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_len=max_len, compile=compile)
    runner = EngineRunner(engine)
    created = int(time.time())
    V = model.config.vocab_size

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runner.stop)

    # with a key, the schema pages are served below behind it (FastAPI's own are open to anyone)
    open_docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="nanoseek", version=__version__, lifespan=lifespan, **open_docs)
    app.state.engine, app.state.runner, app.state.model_name = engine, runner, model_name
    metrics = Metrics(runner)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        log.exception("request failed")
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}", type="server_error").body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 7235)
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def too_large(size: str) -> APIError:
        return APIError(413, f"the request body ({size}) is larger than this server's limit of {max_body_bytes} "
                             "bytes", code="request_too_large")

    async def read_body(request: Request) -> dict:
        """The JSON body, read up to max_body_bytes (413 beyond), parsed and checked off the event loop."""
        authorize(request)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_large(f"{int(length)} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_large(f"more than {max_body_bytes} bytes")
            chunks.append(chunk)
        body = await asyncio.to_thread(parse_json, b"".join(chunks))
        name = body.get("model")
        if name is not None and name != model_name:
            raise APIError(404, f"the model `{_short_name(name)}` does not exist; this server serves `{model_name}`",
                           param="model", code="model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise APIError(400, f"stream must be a boolean, got {body['stream']!r:.200}", param="stream")
        return body

    def check_length(ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param} must not be empty", param=param)
        if len(ids) >= engine.max_len:
            raise APIError(400, f"this model's maximum context length is {engine.max_len} tokens, and the prompt "
                                f"({param}) takes {len(ids)}, leaving no room to generate", param=param,
                           code="context_length_exceeded")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek",
                "max_model_len": engine.max_len}

    @app.get("/health")
    async def health():
        return {"status": "ok", "num_requests": runner.num_requests, "max_live": runner.max_live}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        """Prometheus text (open, like /health and vLLM's): requests, tokens, latency, queue, running."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    if api_key is not None:
        @app.get("/openapi.json", include_in_schema=False)
        async def openapi_json(request: Request):
            authorize(request)
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False)
        async def docs(request: Request):
            authorize(request)
            from fastapi.openapi.docs import get_swagger_ui_html

            return get_swagger_ui_html(openapi_url="/openapi.json", title="nanoseek")

    def prepare_tokenize(body: dict) -> dict:
        check_fields(TokenizeRequest, body)
        if (body.get("prompt") is None) == (body.get("messages") is None):
            raise APIError(400, "tokenize takes exactly one of prompt and messages", param="prompt")
        if body.get("prompt") is not None:
            ids = tokenizer.encode(body["prompt"])
        else:
            tools, choice = chat_tools(body, tokenizer)
            try:
                ids = tokenizer.apply_chat_template(
                    chat_messages(body), thinking=chat_thinking(body, thinking),
                    add_generation_prompt=bool_field(body, "add_generation_prompt", True), keep_last_reasoning=False,
                    tools=tools if choice != "none" else None)
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_len}

    @app.post("/tokenize", openapi_extra=openapi_body(TokenizeRequest))
    async def tokenize(request: Request):
        """vLLM's /tokenize: a prompt (as /v1/completions encodes it) or messages (as /v1/chat/completions)."""
        body = await read_body(request)
        return await asyncio.to_thread(prepare_tokenize, body)

    @app.post("/detokenize", openapi_extra=openapi_body(DetokenizeRequest))
    async def detokenize(request: Request):
        body = await read_body(request)

        def run() -> dict:
            check_fields(DetokenizeRequest, body)
            bad = [t for t in body["tokens"] if not 0 <= t < V]
            if bad:
                raise APIError(400, f"tokens must be token ids in [0, {V}), got {_short_name(bad[:5])}", param="tokens")
            return {"prompt": tokenizer.decode(body["tokens"])}

        return await asyncio.to_thread(run)

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        authorize(request)
        if name != model_name:
            raise APIError(404, f"the model `{name}` does not exist", param="model", code="model_not_found")
        return model_card()

    # ------------------------------------------------------------------ /v1/completions
    def prepare_completion(body: dict):
        """Every check of a completions request, then its tokenisation (in a worker thread): nothing is queued
        before all of it passed."""
        check_fields(CompletionRequest, body)
        k = integer_field(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
        echo = bool_field(body, "echo", False)
        if echo and body.get("stream"):
            raise APIError(400, "echo with stream is not supported by this server", param="echo")
        score_only = echo and body.get("max_tokens") == 0  # echo + max_tokens 0: score the prompt only
        params = sampling_params({**body, "max_tokens": 1} if score_only else body, 16, V, engine.max_len,
                                 logprobs=k is not None, top_logprobs=k or 0, defaults=generation_defaults)
        include_usage = stream_usage(body)
        prompt = body.get("prompt")
        many = isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
        check_samples(len(prompt) if many else 1, params.n, max_samples, "prompt")
        prompts = completion_prompts(prompt, tokenizer, V)
        for ids in prompts:
            check_length(ids, "prompt")
            if not score_only:
                check_context(len(ids), body, ("max_tokens",), engine.max_len)
        dry_run(params, V)
        return prompts, params, k, echo, score_only, include_usage

    @app.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(request: Request):
        body = await read_body(request)
        prompts, params, k, echo, score_only, include_usage = await asyncio.to_thread(prepare_completion, body)
        gen = None if score_only else _Generation(runner, prompts, params, "prompt")
        rid, n = f"cmpl-{uuid.uuid4().hex}", params.n
        skip = params.skip_special_tokens

        def head(choices):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": choices}

        if body.get("stream"):
            async def chunks():
                tokens = 0
                async for i, ev in gen.events():
                    tokens += ev.token_id >= 0
                    if not (ev.text_delta or ev.finished or k is not None):
                        continue
                    lp = completion_logprobs([ev.token_id], [ev.logprob], tokenizer,
                                             [ev.top_logprobs] if k else None, skip_special=skip) if k is not None \
                        and ev.token_id >= 0 else None
                    yield sse(head([{"index": i * n + ev.sample_index, "text": ev.text_delta, "logprobs": lp,
                                      "finish_reason": ev.finish_reason if ev.finished else None}]))
                if include_usage:
                    yield sse({**head([]), "usage": usage(prompts, tokens)})

            return gen.sse_response(chunks())

        if gen is not None:
            await gen.drain(request)
        scored = [None] * len(prompts)
        if echo and k is not None:  # the prompt's own log-probs: one forward each, off the event loop
            scored = [await asyncio.to_thread(engine.prompt_logprobs, ids, k) for ids in prompts]

        def build() -> dict:  # decoding every token for the response: off the event loop too
            echoed = [None] * len(prompts)
            if echo:
                echoed = [(tokenizer.decode(ids), None if sc is None else
                           completion_logprobs(ids, sc[0], tokenizer, sc[1] if k else None))
                          for ids, sc in zip(prompts, scored)]
            choices, tokens = [], 0
            for i in range(len(prompts)):
                outs = gen.handles[i].completions if gen is not None else [None] * n
                for j, c in enumerate(outs):
                    ids, lps, tops = (c.token_ids, c.logprobs, c.top_logprobs) if c is not None else ([], [], [])
                    tokens += len(ids)
                    text = c.text if c is not None else ""
                    lp = completion_logprobs(ids, lps, tokenizer, tops if k else None, skip_special=skip) \
                        if k is not None else None
                    if echoed[i] is not None:
                        prefix, plp = echoed[i]
                        if lp is not None:
                            lp = merge_logprobs(plp, completion_logprobs(ids, lps, tokenizer, tops if k else None,
                                                                          offset=len(prefix), skip_special=skip))
                        text = prefix + text
                    choices.append({"index": i * n + j, "text": text, "logprobs": lp,
                                    "finish_reason": c.finish_reason if c is not None else "length"})
            return {**head(choices), "usage": usage(prompts, tokens)}

        return JSONResponse(await asyncio.to_thread(build))

    # ------------------------------------------------------------------ /v1/chat/completions
    def prepare_chat(body: dict):
        """Every check of a chat request, then the chat's rendering and tokenisation (in a worker thread)."""
        check_fields(ChatCompletionRequest, body)
        messages = chat_messages(body)
        if messages[-1]["role"] == "assistant":  # the template gives a finished chat no generation prompt
            raise APIError(400, f"messages[{len(messages) - 1}] is an assistant turn: a chat must end with a user or "
                                "tool message (continuing a final assistant message is not supported)",
                           param="messages")
        think = chat_thinking(body, thinking)
        tools, choice = chat_tools(body, tokenizer)
        if body.get("echo"):
            raise APIError(400, "echo is not supported for chat completions", param="echo")
        want_lp = bool_field(body, "logprobs", False)
        top = integer_field(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
        if top is not None and not want_lp:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        names = ("max_tokens", "max_completion_tokens")
        params = sampling_params(body, engine.max_len, V, engine.max_len, names, logprobs=want_lp,
                                 top_logprobs=top or 0, defaults=generation_defaults)
        include_usage = stream_usage(body)
        check_samples(1, params.n, max_samples, "n")
        try:  # message content is encoded as text: a special-token string in it never becomes a control token
            ids = tokenizer.apply_chat_template(messages, thinking=think, add_generation_prompt=True,
                                                keep_last_reasoning=False, tools=tools if choice != "none" else None)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        tool = None
        if tools is not None and choice != "none":  # tool_choice "none": tools neither shown nor parsed
            # required / a named function: the prompt ends with the opened call (see tool_calls.forced_prefix)
            forced, forced_ids = forced_prefix(choice, think, tokenizer)
            ids = ids + forced_ids
            stops = [tokenizer.tool_token_id(TOOL_CALLS_END)]  # the block is closed: no need to wait for EOS
            if body.get("parallel_tool_calls") is False:  # at most one call: stop when it closes
                stops.append(tokenizer.tool_token_id(TOOL_CALL_END))
            params = dataclasses.replace(params, stop_token_ids=list(params.stop_token_ids or []) + stops)
            tool = ({t["function"]["name"] for t in tools}, forced)
        check_length(ids, "messages")
        check_context(len(ids), body, names, engine.max_len)
        if all(body.get(name) is None for name in names):  # default: up to the end of the context
            params = with_max_tokens(params, engine.max_len - len(ids))
        dry_run(params, V)
        return ids, think, want_lp, params, include_usage, tool

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = await read_body(request)
        ids, think, want_lp, params, include_usage, tool = await asyncio.to_thread(prepare_chat, body)
        gen = _Generation(runner, [ids], params, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        names, forced = tool if tool is not None else (set(), "")

        def closing(token_id: int | None, reason: str | None) -> str:
            """The text of the stop token that ended a tool-calls block (kept out of the completion's text)."""
            if tool is None or reason != "stop" or token_id is None:
                return ""
            if token_id == tokenizer.tool_token_id(TOOL_CALLS_END):
                return TOOL_CALLS_END
            return TOOL_CALL_END + TOOL_CALLS_END if token_id == tokenizer.tool_token_id(TOOL_CALL_END) else ""

        def head(choices, obj="chat.completion"):
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices}

        if body.get("stream"):
            async def chunks():
                splitters = [ReasoningSplitter(think, strip_answer=False) for _ in range(params.n)]
                calls = [ToolCallStreamer(names) for _ in range(params.n)] if tool is not None else None
                tokens = 0

                def feed(j, text):  # -> (reasoning delta, content delta)
                    dr, da = splitters[j].feed(text)
                    return dr, calls[j].feed(da) if calls is not None else da

                def chunk(j, delta, finish=None, lp=None):
                    return sse(head([{"index": j, "delta": delta, "logprobs": lp, "finish_reason": finish}],
                                     "chat.completion.chunk"))

                for j in range(params.n):
                    yield chunk(j, {"role": "assistant", "content": ""})
                    if forced:  # the forced start of a call is part of the completion, though the prompt held it
                        dr, da = feed(j, forced)
                        if dr or da:
                            yield chunk(j, {"reasoning_content": dr, "reasoning": dr} if dr else {"content": da})
                async for _, ev in gen.events():
                    j = ev.sample_index
                    tokens += ev.token_id >= 0
                    dr, da = feed(j, ev.text_delta)
                    finish, found = ev.finish_reason, None
                    if ev.finished:
                        r, a = feed(j, closing(ev.token_id, ev.finish_reason))
                        fr, fa = splitters[j].finish()
                        if calls is not None:
                            fa = calls[j].feed(fa)
                            end, found = calls[j].finish()
                            fa += end
                        dr, da = dr + r + fr, da + a + fa
                        finish = "tool_calls" if found else finish
                    lp = chat_logprobs([ev.token_id], [ev.logprob], tokenizer,
                                       [ev.top_logprobs] if ev.top_logprobs else None) if want_lp \
                        and ev.token_id >= 0 else None
                    if dr:
                        yield chunk(j, {"reasoning_content": dr, "reasoning": dr}, lp=None if da else lp)
                    if da:
                        yield chunk(j, {"content": da}, lp=lp)
                    if lp is not None and not (dr or da):
                        yield chunk(j, {}, lp=lp)
                    if found:
                        yield chunk(j, {"tool_calls": [{"index": k, **c} for k, c in enumerate(found)]})
                    if ev.finished:
                        yield chunk(j, {}, finish)
                if include_usage:
                    yield sse({**head([], "chat.completion.chunk"), "usage": usage([ids], tokens)})

            return gen.sse_response(chunks())

        await gen.drain(request)

        def build() -> dict:
            choices, tokens = [], 0
            for j, c in enumerate(gen.handles[0].completions):
                tokens += len(c.token_ids)
                last = c.token_ids[-1] if c.token_ids else None
                reasoning, answer = split_reasoning(forced + c.text + closing(last, c.finish_reason), think)
                message: dict[str, Any] = {"role": "assistant", "content": answer}
                if think or reasoning:  # thinking off, yet the model reasoned and closed it: apart, as when on
                    message["reasoning_content"] = message["reasoning"] = reasoning  # DeepSeek's name, vLLM's
                finish = c.finish_reason
                if tool is not None:
                    message["content"], found = parse_tool_calls(answer, names)
                    if found:
                        message["tool_calls"], finish = found, "tool_calls"
                choices.append({"index": j, "message": message, "finish_reason": finish,
                                "logprobs": chat_logprobs(c.token_ids, c.logprobs, tokenizer, c.top_logprobs)
                                if want_lp else None})
            return {**head(choices), "usage": usage([ids], tokens)}

        return JSONResponse(await asyncio.to_thread(build))

    return app


def _short_name(v) -> str:
    r = str(v)
    return r if len(r) <= 200 else r[:200] + "..."
