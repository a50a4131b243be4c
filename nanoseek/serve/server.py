"""OpenAI-compatible HTTP server over one continuous-batching Engine.

One Engine, driven by one background thread (`EngineRunner`), serves every request: handlers enqueue
with `Engine.add_request` and await their events through an asyncio.Queue fed from the engine thread
(`loop.call_soon_threadsafe`), so concurrent requests decode in the same batches and the event loop never
blocks on the model.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent
events ending with `data: [DONE]`), GET /health. Chat thinking follows DeepSeek's API: the message's
`content` is the answer and `reasoning_content` the chain of thought (only when thinking). Thinking is
chosen per request by `{"thinking": {"type": "enabled"|"disabled"}}` (DeepSeek) or
`{"chat_template_kwargs": {"thinking": bool}}` (vLLM), else by the server default.

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request
(malformed JSON, an invalid field, a prompt that fills the context), 401 for a missing or wrong API key,
404 for an unknown model or route.

Request fields are checked in protocol.py, the reasoning/answer split of a stream in reasoning.py.

Log-probs: `logprobs` (completions: 0-20 alternatives; chat: `logprobs` + `top_logprobs` 0-20) give the
sampled token's log-prob and the top alternatives; for temperature > 0 under the processed sampling
distribution (see engine/sampling.py), for greedy under the raw one. Completions take `echo` (the prompt's
text and, with `logprobs`, its tokens' log-probs under the raw distribution, the first one null), and
`echo` with `max_tokens: 0` scores the prompt without generating: what lm-evaluation-harness's
`local-completions` loglikelihood requests send.

Simplifications: a request's max_tokens may run past the context, in which case it ends with
finish_reason "length" when the cache row is full (OpenAI would refuse it); no tools, penalties,
logit_bias or suffix, and no echo when streaming or in chat (asking for them is a 400).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, RequestHandle, SamplingParams, StreamEvent
from ..engine.sampling import MAX_TOP_LOGPROBS
from .protocol import (
    APIError,
    bool_field,
    chat_logprobs,
    chat_messages,
    chat_thinking,
    completion_logprobs,
    completion_prompts,
    integer_field,
    merge_logprobs,
    sampling_params,
    split_reasoning,
    sse,
    stream_usage,
    usage,
)
from .reasoning import ReasoningSplitter

log = logging.getLogger("nanoseek.serve")
SSE_HEADERS = {"Cache-Control": "no-cache"}


class EngineFailure:
    """Sent to every request in flight when an engine step raised (the engine thread then carries on)."""

    def __init__(self, message: str):
        self.message = message


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
            except Exception as e:  # keep serving: fail the requests in flight, drop them from the engine
                log.exception("engine step failed")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            entries, self._inflight = list(self._inflight.values()), {}
        for handle, sink in entries:
            if handle is not None:
                handle.cancel()
            _call(sink, EngineFailure(message))

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               sink: Callable[[StreamEvent | EngineFailure], None]) -> RequestHandle:
        """Queue a request; sink gets its StreamEvents on the engine thread (it must not block)."""
        self.start()
        with self._lock:
            key, self._next_key = self._next_key, self._next_key + 1
            entry = self._inflight[key] = [None, sink]
        left = [params.n]

        def on_event(ev: StreamEvent) -> None:  # runs on the engine thread, inside step()
            # rows in use right now; a sequence that just finished has already given its row back
            live = sum(s is not None for s in self.engine.slots) + (ev.finished and ev.finish_reason != "abort")
            self.max_live = max(self.max_live, live)
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

    async def drain(self) -> None:
        """Wait until every sample finished (non-streaming requests); cancels what is left on the way out."""
        try:
            async for _ in self.events():
                pass
        finally:
            self.cancel()

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
               max_len: int | None = None, thinking: bool = True, compile: bool = False) -> FastAPI:
    """The FastAPI app serving `model` under `model_name`. thinking: the chat default when a request says
    nothing; compile: Engine(compile=True). The engine thread starts with the app (lifespan) or at the first
    request, and stops with it."""
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

    app = FastAPI(title="nanoseek", lifespan=lifespan)
    app.state.engine, app.state.runner, app.state.model_name = engine, runner, model_name

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
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(auth[len("Bearer "):].strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        name = body.get("model")
        if name is not None and name != model_name:
            raise APIError(404, f"the model `{name}` does not exist; this server serves `{model_name}`",
                           param="model", code="model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise APIError(400, f"stream must be a boolean, got {body['stream']!r}", param="stream")
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
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompts = completion_prompts(body.get("prompt"), tokenizer, V)
        for ids in prompts:
            check_length(ids, "prompt")
        k = integer_field(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
        echo = bool_field(body, "echo", False)
        if echo and body.get("stream"):
            raise APIError(400, "echo with stream is not supported by this server", param="echo")
        score_only = echo and body.get("max_tokens") == 0  # echo + max_tokens 0: score the prompt only
        params = sampling_params({**body, "max_tokens": 1} if score_only else body, 16, logprobs=k is not None,
                                 top_logprobs=k or 0)
        include_usage = stream_usage(body)
        if score_only:
            gen = None
        else:
            gen = _Generation(runner, prompts, params, "prompt")
        rid, n = f"cmpl-{uuid.uuid4().hex}", params.n

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
                                             [ev.top_logprobs] if k else None) if k is not None \
                        and ev.token_id >= 0 else None
                    yield sse(head([{"index": i * n + ev.sample_index, "text": ev.text_delta, "logprobs": lp,
                                      "finish_reason": ev.finish_reason if ev.finished else None}]))
                if include_usage:
                    yield sse({**head([]), "usage": usage(prompts, tokens)})

            return gen.sse_response(chunks())

        if gen is not None:
            await gen.drain()
        echoed = [None] * len(prompts)
        if echo:  # the prompt's own log-probs: one forward each, off the event loop
            scored = [await asyncio.to_thread(engine.prompt_logprobs, ids, k or 0) if k is not None else None
                      for ids in prompts]
            echoed = [(tokenizer.decode(ids), None if sc is None else
                       completion_logprobs(ids, sc[0], tokenizer, sc[1] if k else None)) for ids, sc in zip(prompts, scored)]
        choices, tokens = [], 0
        for i in range(len(prompts)):
            outs = gen.handles[i].completions if gen is not None else [None] * n
            for j, c in enumerate(outs):
                ids, lps, tops = (c.token_ids, c.logprobs, c.top_logprobs) if c is not None else ([], [], [])
                tokens += len(ids)
                text = c.text if c is not None else ""
                lp = completion_logprobs(ids, lps, tokenizer, tops if k else None) if k is not None else None
                if echoed[i] is not None:
                    prefix, plp = echoed[i]
                    if lp is not None:
                        lp = merge_logprobs(plp, completion_logprobs(ids, lps, tokenizer, tops if k else None,
                                                                      offset=len(prefix)))
                    text = prefix + text
                choices.append({"index": i * n + j, "text": text, "logprobs": lp,
                                "finish_reason": c.finish_reason if c is not None else "length"})
        return {**head(choices), "usage": usage(prompts, tokens)}

    # ------------------------------------------------------------------ /v1/chat/completions
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = chat_messages(body)
        think = chat_thinking(body, thinking)
        try:
            ids = tokenizer.apply_chat_template(messages, thinking=think, add_generation_prompt=True,
                                                keep_last_reasoning=False)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        check_length(ids, "messages")
        if body.get("echo"):
            raise APIError(400, "echo is not supported for chat completions", param="echo")
        want_lp = bool_field(body, "logprobs", False)
        top = integer_field(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
        if top is not None and not want_lp:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = sampling_params(body, engine.max_len - len(ids), ("max_tokens", "max_completion_tokens"),
                                 logprobs=want_lp, top_logprobs=top or 0)
        include_usage = stream_usage(body)
        gen = _Generation(runner, [ids], params, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def head(choices, obj="chat.completion"):
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices}

        if body.get("stream"):
            async def chunks():
                splitters = [ReasoningSplitter(think) for _ in range(params.n)]
                tokens = 0

                def chunk(j, delta, finish=None, lp=None):
                    return sse(head([{"index": j, "delta": delta, "logprobs": lp, "finish_reason": finish}],
                                     "chat.completion.chunk"))

                for j in range(params.n):
                    yield chunk(j, {"role": "assistant", "content": ""})
                async for _, ev in gen.events():
                    j = ev.sample_index
                    tokens += ev.token_id >= 0
                    dr, da = splitters[j].feed(ev.text_delta)
                    if ev.finished:
                        fr, fa = splitters[j].finish()
                        dr, da = dr + fr, da + fa
                    lp = chat_logprobs([ev.token_id], [ev.logprob], tokenizer,
                                       [ev.top_logprobs] if ev.top_logprobs else None) if want_lp \
                        and ev.token_id >= 0 else None
                    if dr:
                        yield chunk(j, {"reasoning_content": dr}, lp=None if da else lp)
                    if da:
                        yield chunk(j, {"content": da}, lp=lp)
                    if lp is not None and not (dr or da):
                        yield chunk(j, {}, lp=lp)
                    if ev.finished:
                        yield chunk(j, {}, ev.finish_reason)
                if include_usage:
                    yield sse({**head([], "chat.completion.chunk"), "usage": usage([ids], tokens)})

            return gen.sse_response(chunks())

        await gen.drain()
        choices, tokens = [], 0
        for j, c in enumerate(gen.handles[0].completions):
            tokens += len(c.token_ids)
            reasoning, answer = split_reasoning(c.text, think)
            message: dict[str, Any] = {"role": "assistant", "content": answer}
            if think:
                message["reasoning_content"] = reasoning
            choices.append({"index": j, "message": message, "finish_reason": c.finish_reason,
                            "logprobs": chat_logprobs(c.token_ids, c.logprobs, tokenizer, c.top_logprobs)
                            if want_lp else None})
        return {**head(choices), "usage": usage([ids], tokens)}

    return app
