"""The BentoML service: the twin API mounted in a module-level service class.

Composition only: settings from the environment become the service's typed
configuration; nothing happens on import but reading the environment, and each worker's
``__init__`` migrates the store, loads the champion and starts watching.

    bentoml serve twincast.service:Twincast      (or: twincast serve)
"""

from __future__ import annotations

import bentoml

from serving.api.app import create_app
from serving.bento import BentoGuard, start_worker
from serving.runtime import patch_bentoml_metrics, patch_bentoml_timeout
from twincast.settings import Settings

SETTINGS = Settings()  # environment only: no I/O
CONFIG = SETTINGS.serving()
app = create_app(open_docs=CONFIG.open_docs)
# class patches (no I/O), in place before BentoML answers its first probe: see runtime.py
patch_bentoml_timeout()
patch_bentoml_metrics(app)


@bentoml.service(
    name="twincast",
    workers=SETTINGS.workers,
    traffic={"timeout": 120},
    logging={"access": {"enabled": False}},
    # without tracing, every URL is excluded: the middleware passes requests straight on
    **({} if SETTINGS.tracing else {"tracing": {"excluded_urls": [".*"]}}),
)
@bentoml.asgi_app(app, path="/")
class Twincast:
    def __init__(self) -> None:
        self.service = start_worker(app, CONFIG)


Twincast.add_asgi_middleware(BentoGuard, api=app, open_metrics=CONFIG.open_metrics)
