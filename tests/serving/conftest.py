"""A real twin service (``bentoml serve``) on a free loopback port, per database."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, stop

CDS_ISSUER = "https://ehr.example.org"
JWKS_ISSUER = "https://rotating.example.org"  # registers a JWKS of two keys (kids a, b)


def jwks_keys() -> tuple[dict[str, str], dict]:
    """Two EC P-384 keys: the private PEMs by kid, and the public JWKS document."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    private, keys = {}, []
    for kid in ("a", "b"):
        key = ec.generate_private_key(ec.SECP384R1())
        private[kid] = key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode()
        keys.append({**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid,
                     "use": "sig", "alg": "ES384"})
    return private, {"keys": keys}


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


def event_rows(frame) -> list:
    """Canonical MEDS events as the write path takes them (naive UTC)."""
    import pandas as pd

    from serving.store.twins import EventRow

    return [EventRow(None if pd.isna(r.time) else pd.Timestamp(r.time).to_pydatetime(),
                     str(r.code), None if pd.isna(r.numeric_value) else float(r.numeric_value),
                     None) for r in frame.itertuples()]


class Server:
    def __init__(self, url: str, home: Path, tracking_uri: str, db_url: str, keys: dict,
                 cds_private_key: str = "", jwks_private: dict[str, str] | None = None):
        self.url, self.home, self.tracking_uri, self.db_url, self.keys = (
            url, home, tracking_uri, db_url, keys)
        self.cds_private_key = cds_private_key
        self.jwks_private = jwks_private or {}

    def client(self, role: str | None = "clinical", headers: dict | None = None
               ) -> httpx.Client:
        auth = {"Authorization": f"Bearer {self.keys[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers={**auth, **(headers or {})},
                            timeout=60)


def _start(home: Path, env: dict, wait: str = "/v1/ready") -> tuple[subprocess.Popen, str]:
    """``bentoml serve`` the twin service; returns once ``wait`` answers 200.  A port
    taken between choosing it and binding it (BentoML's process manager picks ports of
    its own meanwhile) is tried again on another."""
    for attempt in range(3):
        try:
            return _start_once(home, env, wait)
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    pass


def _start_once(home: Path, env: dict, wait: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"TWINCAST_PUBLIC_URL": url, **env}  # CDS tokens name this URL as audience
    pinned = env["TWINCAST_PUBLIC_URL"] != url  # the caller fixed the URL: no new port
    log = open(home / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", "twincast.service:Twincast",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}{wait}", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            text = (home / "server.log").read_text()[-4000:]
            if "Address already in use" in text and not pinned:
                raise PortTaken(text)
            raise RuntimeError("twin service did not start:\n" + text)
        time.sleep(0.3)


@contextlib.contextmanager
def start_server(kind: str, tmp_path_factory, mlflow_home: Path, *, db_url: str | None = None,
                 extra_keys: dict[str, str] | None = None, env: dict[str, str] | None = None
                 ) -> Iterator[Server]:
    """A real twin service (``bentoml serve``) over a copy of the session's MLflow store
    (so promotions touch nothing else) and a fresh twin database, with a key per role."""
    import json

    from serving.store import open_store

    home = tmp_path_factory.mktemp(f"svc-{kind}")
    shutil.copy(mlflow_home / "mlflow.db", home / "mlflow.db")
    tracking = f"sqlite:///{home / 'mlflow.db'}"
    db_url = db_url or f"sqlite:///{home / 'twins.db'}"
    private, public = cds_keypair()
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TWINCAST_", "MLFLOW_T"))}
    jwks_private, jwks = jwks_keys()
    full["TWINCAST_CDS_CLIENTS"] = json.dumps({
        CDS_ISSUER: {"public_key": public, "algorithms": ["RS384"]},
        JWKS_ISSUER: {"jwks": jwks, "algorithms": ["ES384"]}})
    full.update({"TWINCAST_HOME": str(home), "TWINCAST_MLFLOW_URI": tracking,
                 "TWINCAST_DATABASE_URL": db_url, "TWINCAST_TASK": "eskd",
                 "TWINCAST_MODEL_POLL_SECONDS": "1", "BENTOML_HOME": str(home / "bentoml"),
                 "BENTOML_DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                 **(env or {})})
    store = open_store(db_url)
    roles = {"clinical": "clinical", "auditor": "auditor", "admin": "admin",
             **(extra_keys or {})}
    keys = {name: store.keys.create(f"{name}-key", role) for name, role in roles.items()}
    store.dispose()
    proc, url = _start(home, full)
    try:
        server = Server(url, home, tracking, db_url, keys, private, jwks_private)
        server.proc = proc
        yield server
    finally:
        stop(proc)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, trained, mlflow_home, tmp_path_factory):
    """One worker, SQLite then PostgreSQL."""
    db = None if request.param == "sqlite" else request.getfixturevalue("pg_database_module")
    with start_server(request.param, tmp_path_factory, mlflow_home, db_url=db) as srv:
        yield srv


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """A fresh twin database URL: SQLite, then PostgreSQL (which fails under CI=true
    when unreachable)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'twins.db'}"
    else:
        yield request.getfixturevalue("pg_database")


@pytest.fixture
def store(database):
    """A migrated twin store on each database."""
    from serving.store import open_store

    st = open_store(database)
    yield st
    st.dispose()


@pytest.fixture(scope="module")
def pg_database_module():
    """A PostgreSQL database for one test module (fails under CI=true if unreachable)."""
    from tests.conftest import fresh_pg_database

    with fresh_pg_database("twincast_svc") as url:
        yield url
