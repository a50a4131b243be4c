"""Prometheus metrics of the server (`GET /metrics`, text format 0.0.4): what vLLM users scrape.

nanoseek_requests_total{endpoint, status}    counter: HTTP requests answered, by route and status code
nanoseek_request_latency_seconds{endpoint}   histogram: request start to the last byte sent (streams included)
nanoseek_prompt_tokens_total                 counter: prompt tokens queued (once per prompt, not per sample)
nanoseek_generation_tokens_total             counter: tokens generated
nanoseek_num_requests_waiting                gauge: samples queued for a cache row
nanoseek_num_requests_running                gauge: samples holding a cache row
"""

from __future__ import annotations

import threading
import time

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # seconds; +Inf is implicit
_TRACKED = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize")


class Metrics:
    def __init__(self, runner):
        self.runner = runner
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list] = {}  # endpoint -> [bucket counts..., sum, count]

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            h = self.latency.setdefault(endpoint, [0] * len(BUCKETS) + [0.0, 0])
            for i, b in enumerate(BUCKETS):
                h[i] += seconds <= b
            h[-2] += seconds
            h[-1] += 1

    def render(self) -> str:
        eng = self.runner.engine
        with self._lock:
            requests, latency = dict(self.requests), {k: list(v) for k, v in self.latency.items()}
        out = ["# HELP nanoseek_requests_total HTTP requests answered, by endpoint and status code.",
               "# TYPE nanoseek_requests_total counter"]
        out += [f'nanoseek_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(requests.items())]
        out += ["# HELP nanoseek_request_latency_seconds Request start to the last byte sent.",
                "# TYPE nanoseek_request_latency_seconds histogram"]
        for e, h in sorted(latency.items()):
            out += [f'nanoseek_request_latency_seconds_bucket{{endpoint="{e}",le="{b}"}} {c}'
                    for b, c in zip(BUCKETS, h)]
            out += [f'nanoseek_request_latency_seconds_bucket{{endpoint="{e}",le="+Inf"}} {h[-1]}',
                    f'nanoseek_request_latency_seconds_sum{{endpoint="{e}"}} {h[-2]:.6f}',
                    f'nanoseek_request_latency_seconds_count{{endpoint="{e}"}} {h[-1]}']
        waiting = len(eng._inbox) + len(eng._waiting)
        running = sum(s is not None for s in eng.slots)
        for name, kind, help_, v in (
                ("prompt_tokens_total", "counter", "Prompt tokens queued.", self.runner.prompt_tokens),
                ("generation_tokens_total", "counter", "Tokens generated.", self.runner.generation_tokens),
                ("num_requests_waiting", "gauge", "Samples queued for a cache row.", waiting),
                ("num_requests_running", "gauge", "Samples holding a cache row.", running)):
            out += [f"# HELP nanoseek_{name} {help_}", f"# TYPE nanoseek_{name} {kind}", f"nanoseek_{name} {v}"]
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """Pure ASGI: times each tracked request from its start to its last body byte (a stream's end) and counts it
    by status code."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(_TRACKED):
            return await self.app(scope, receive, send)
        endpoint = "/v1/models" if path.startswith("/v1/models") else path
        start, status = time.perf_counter(), [500]
        recorded = [False]

        async def timed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not recorded[0]:
                recorded[0] = True
                self.metrics.observe(endpoint, status[0], time.perf_counter() - start)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            if not recorded[0]:  # the client went away mid-stream, or the app raised
                self.metrics.observe(endpoint, status[0], time.perf_counter() - start)
