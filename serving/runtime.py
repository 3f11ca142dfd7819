"""Worker-process tuning for the BentoML service: the latency tail and its fixes.

Finding (bench/serve_bench.py, DEVELOPERS' closing note of the serving issue): BentoML
1.4's ``TimeoutMiddleware`` schedules ``loop.call_later(timeout, …)`` for every request
and never cancels it, so each request's timer, future and captured context (with its
OpenTelemetry span, locks, deques …) stay alive for the whole traffic timeout (60 s by
default).  At a few thousand requests per second the worker holds hundreds of thousands
of extra objects, and CPython's generation-1/2 garbage collections over that heap stall
the event loop for 100–400 ms: the ~1–2% of requests near 270 ms seen at concurrency 16.

Fix, applied in each worker: cancel the timer when the request finishes (same behaviour
otherwise), freeze the start-up heap out of the collector, and collect the young
generation more often so each pause stays a few milliseconds.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

GC_THRESHOLDS = (20_000, 20, 50)


def patch_bentoml_timeout() -> bool:
    """Make BentoML's TimeoutMiddleware cancel its per-request timer (idempotent)."""
    try:
        from bentoml._internal.server.http import traffic
    except ImportError:  # a BentoML without this module needs no patch
        return False
    cls = traffic.TimeoutMiddleware
    if getattr(cls, "_twincast_patched", False):
        return True

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except TimeoutError:
            if fut.cancel():
                from starlette.responses import JSONResponse

                resp = JSONResponse(
                    {"error": f"Not able to process the request in {self.timeout} seconds"},
                    status_code=504)
                await resp(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()

    cls.__call__ = __call__
    cls._twincast_patched = True
    return True


BENTO_PATHS = ("/metrics", "/healthz", "/livez", "/readyz", "/docs", "/docs.json",
               "/schema.json")
UNMATCHED = "(unmatched)"


def route_template(app: Any):
    """A function mapping a request path to its route's template (``/v1/twins/{subject_id}``)
    — a bounded set of labels whatever the paths clients send."""
    routes = []

    def collect(items) -> None:
        for r in items:
            if hasattr(r, "path_regex"):
                routes.append((r.path_regex, r.path))
            inner = getattr(r, "original_router", None)  # FastAPI's included routers
            if inner is not None:
                collect(inner.routes)

    collect(getattr(app, "routes", []))

    def template(path: str) -> str:
        if path in BENTO_PATHS:
            return path
        for regex, name in routes:
            if regex.match(path):
                return name
        return UNMATCHED
    return template


class _Templated:
    """A Prometheus metric whose ``endpoint`` label is the route template."""

    def __init__(self, metric: Any, template):
        self._metric, self._template = metric, template

    def labels(self, *args: Any, **kw: Any):
        if "endpoint" in kw:
            kw["endpoint"] = self._template(kw["endpoint"])
        return self._metric.labels(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


def patch_bentoml_metrics(app: Any) -> bool:
    """BentoML 1.4 labels its request metrics with the raw path, so every twin id makes
    new series: memory that grows with every twin served (and the long generation-2
    garbage collections that come with it) and a ``/metrics`` as large as the twin
    count.  Label them with the matched route's template instead (idempotent)."""
    try:
        from bentoml._internal.server.http import instruments
    except ImportError:
        return False
    template = route_template(app)
    for cls in (instruments.HTTPTrafficMetricsMiddleware,
                instruments.RunnerTrafficMetricsMiddleware):
        if getattr(cls, "_twincast_patched", False):
            continue

        def _setup(self, *args: Any, _orig=cls._setup, **kw: Any) -> None:
            _orig(self, *args, **kw)
            for name in list(vars(self)):
                if name.startswith("metrics_") and name != "metrics_client":
                    setattr(self, name, _Templated(getattr(self, name), template))

        cls._setup = _setup
        cls._twincast_patched = True
    return True


def tune_gc() -> None:
    """Keep start-up objects out of every collection; keep pauses short."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
