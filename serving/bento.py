"""Pieces of the BentoML service that are serving's own: the guard on BentoML's own
routes and what each worker does at start.  The module-level service class lives in the
composition package (``twincast.service``), which fills in the configuration."""

from __future__ import annotations

import logging
from typing import Any

import anyio

from serving.config import ServingConfig

INTERNAL = (b'{"error":"internal_error","message":"the request failed inside the '
            b'service","fields":[]}')
NOT_FOUND = b'{"error":"not_found","message":"no such route","fields":[]}'
NOT_ALLOWED = b'{"error":"method_not_allowed","message":"method not allowed here","fields":[]}'
log = logging.getLogger("twincast.api")
GUARDED_BENTO_PATHS = ("/metrics", "/docs", "/docs.json", "/schema.json")
UNAUTHORIZED = (b'{"error":"unauthorized","message":"an API key is needed for this '
                b'route","fields":[]}')


class BentoGuard:
    """Bearer keys for BentoML's own /metrics and /docs unless configured open; and
    BentoML's plain-text answers for paths no route serves (a path with a control
    character never reaches the app) become the API's JSON errors."""

    def __init__(self, app, *, api: Any, open_metrics: bool = False, **_: object):
        self.app = app
        self.api = api
        self.open = open_metrics

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and not self.open
                and scope["path"] in GUARDED_BENTO_PATHS):
            service = getattr(self.api.state, "service", None)
            headers = dict(scope.get("headers") or [])
            scheme, _, token = headers.get(b"authorization", b"").decode(
                errors="replace").partition(" ")
            key = None
            if service is not None and scheme.lower() == "bearer" and token.strip():
                key = await anyio.to_thread.run_sync(service.store.keys.authenticate,
                                                     token.strip())
            if key is None:
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": UNAUTHORIZED})
                return
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        plain, started = False, False

        async def _send(message) -> None:
            nonlocal plain, started
            if message["type"] == "http.response.start":
                started = True
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                if ctype.startswith(b"text/plain"):
                    plain = True
                    status = message["status"]
                    body = NOT_FOUND if status == 404 else NOT_ALLOWED
                    await send({"type": "http.response.start", "status": status,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode()),
                                            *[(k, v) for k, v in message.get("headers", [])
                                              if k.lower() == b"allow"]]})
                    await send({"type": "http.response.body", "body": body})
                    return
            if not plain:
                await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception as exc:
            # Starlette re-raises after answering a bug's 500: stop it here, so the server's
            # log gets the exception's type and route, never its message (values)
            log.error("unexpected %s on %s %s", type(exc).__name__, scope.get("method"),
                      scope.get("path"))
            if not started:
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": INTERNAL})


def start_worker(api: Any, config: ServingConfig):
    """In each worker process: the twin service, then the GC tuning.  twincast's own
    lines (model loads, refreshes, anchors, faults — never a value) go to BentoML's log."""
    import logging

    from serving.bootstrap import build_service
    from serving.runtime import tune_gc

    ours = logging.getLogger("twincast")
    ours.setLevel(logging.INFO)
    bento = logging.getLogger("bentoml")
    if not ours.handlers and bento.handlers:
        for handler in bento.handlers:
            ours.addHandler(handler)
        ours.propagate = False
    service = build_service(config)
    api.state.service = service
    tune_gc()
    return service
