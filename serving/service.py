"""The BentoML service: the FastAPI app mounted in a module-level service class.

Nothing happens on import; ``__init__`` (once per worker process) reads the settings,
migrates the store, loads the champion and starts watching its alias.

    bentoml serve serving.service:Twincast      (or: twincast serve)
"""

from __future__ import annotations

import bentoml

from serving.api.app import create_app
from twincast.settings import Settings

OPEN_PATHS = ("/healthz", "/livez", "/readyz", "/v1/health", "/v1/ready")
GUARDED_BENTO_PATHS = ("/metrics", "/docs", "/docs.json", "/schema.json")

SETTINGS = Settings()  # environment only: no I/O
app = create_app(open_docs=SETTINGS.open_docs)


class BentoGuard:
    """Bearer keys for BentoML's own /metrics and /docs unless configured open."""

    def __init__(self, app, **_: object):
        self.app = app
        self.open = SETTINGS.open_metrics

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and not self.open
                and scope["path"] in GUARDED_BENTO_PATHS):
            core = getattr(app.state, "core", None)
            headers = dict(scope.get("headers") or [])
            scheme, _, token = headers.get(b"authorization", b"").decode().partition(" ")
            key = None
            if core is not None and scheme.lower() == "bearer" and token:
                import anyio

                key = await anyio.to_thread.run_sync(core.store.authenticate, token.strip())
            if key is None:
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body",
                            "body": b'{"error":"unauthorized","message":"an API key is '
                                    b'needed for this route","fields":[]}'})
                return
        await self.app(scope, receive, send)


@bentoml.service(
    name="twincast",
    workers=SETTINGS.workers,
    traffic={"timeout": 120},
    logging={"access": {"enabled": False}},
)
@bentoml.asgi_app(app, path="/")
class Twincast:
    def __init__(self) -> None:
        from serving.bootstrap import build_core
        from serving.runtime import patch_bentoml_timeout, tune_gc

        patch_bentoml_timeout()  # the latency tail: see serving/runtime.py
        self.core = build_core()
        app.state.core = self.core
        tune_gc()


Twincast.add_asgi_middleware(BentoGuard)
