"""A real twin service (``bentoml serve``) on a free loopback port, per database."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, stop

CDS_ISSUER = "https://ehr.example.org"


def cds_keypair() -> tuple[str, str]:
    """An RSA key pair for the test CDS client (private PEM, public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo
                                           ).decode()
    return private, public


class Server:
    def __init__(self, url: str, home: Path, tracking_uri: str, db_url: str, keys: dict,
                 cds_private_key: str = ""):
        self.url, self.home, self.tracking_uri, self.db_url, self.keys = (
            url, home, tracking_uri, db_url, keys)
        self.cds_private_key = cds_private_key

    def client(self, role: str | None = "clinical", headers: dict | None = None
               ) -> httpx.Client:
        auth = {"Authorization": f"Bearer {self.keys[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers={**auth, **(headers or {})},
                            timeout=60)


def _start(home: Path, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(home / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", "serving.service:Twincast",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/v1/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("twin service did not start:\n"
                               + (home / "server.log").read_text()[-4000:])
        time.sleep(0.3)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, trained, mlflow_home, tmp_path_factory):
    """The service over a copy of the session's MLflow store (so promotions here touch
    nothing else) and a fresh twin database: SQLite, then PostgreSQL."""
    home = tmp_path_factory.mktemp(f"svc-{request.param}")
    shutil.copy(mlflow_home / "mlflow.db", home / "mlflow.db")
    tracking = f"sqlite:///{home / 'mlflow.db'}"
    if request.param == "sqlite":
        db_url = f"sqlite:///{home / 'twins.db'}"
    else:
        db_url = request.getfixturevalue("pg_database_module")
    import json

    private, public = cds_keypair()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWINCAST_", "MLFLOW_T"))}
    env["TWINCAST_CDS_CLIENTS"] = json.dumps({CDS_ISSUER: {"public_key": public,
                                                           "algorithms": ["RS384"]}})
    env.update({"TWINCAST_HOME": str(home), "TWINCAST_MLFLOW_URI": tracking,
                "TWINCAST_DATABASE_URL": db_url, "TWINCAST_TASK": "eskd",
                "TWINCAST_MODEL_POLL_SECONDS": "1", "BENTOML_HOME": str(home / "bentoml"),
                "BENTOML_DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"})
    from serving.store.repo import open_store

    store = open_store(db_url)
    keys = {role: store.create_key(f"{role}-key", role) for role in
            ("clinical", "auditor", "admin")}
    store.dispose()
    proc, url = _start(home, env)
    try:
        yield Server(url, home, tracking, db_url, keys, private)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def pg_database_module():
    """A PostgreSQL database for one test module (fails under CI=true if unreachable)."""
    from tests.conftest import fresh_pg_database

    with fresh_pg_database("twincast_svc") as url:
        yield url
