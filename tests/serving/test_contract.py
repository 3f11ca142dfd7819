"""The OpenAPI document is the contract: schemathesis (``--checks all``, bounded examples)
against the real server for each role finds no failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = Path(__file__).with_name("schemathesis.toml")
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("role", ["clinical", "auditor", "admin"])
def test_the_api_keeps_its_openapi_contract(server, role, tmp_path):
    # the fuzzer's config lets schema-valid writes get a documented 422: make sure plain
    # valid ones are still accepted, so that allowance cannot hide a server refusing all
    good = {"events": [{"time": "2020-01-01T10:00:00Z", "code": "LAB//EGFR",
                        "numeric_value": 40.0}]}
    with server.client("clinical") as c:
        assert c.post("/v1/forecast", json=good).status_code == 200
        assert c.post("/v1/twins/7400001/events", json=good).status_code == 200
        assert c.post("/v1/twins:bulk", json={"twins": [{"subject_id": 7400002,
                                                         **good}]}).status_code == 200
    env = {**os.environ, "TWINCAST_TEST_KEY": server.keys[role]}
    proc = subprocess.run(
        [str(BIN / "schemathesis"), "--config-file", str(CONFIG), "run",
         f"{server.url}/v1/openapi.json", "--checks", "all", "--workers", "1",
         "--max-examples", os.environ.get("TWINCAST_FUZZ_EXAMPLES", "4"),
         "--phases", "examples,coverage,fuzzing", "--seed", "1",
         "--report", "junit", "--report-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    (tmp_path / "schemathesis.txt").write_text(proc.stdout)
    if os.environ.get("TWINCAST_FUZZ_LOG"):
        Path(os.environ["TWINCAST_FUZZ_LOG"]).write_text(proc.stdout)
    tail = proc.stdout[-6000:]
    assert proc.returncode == 0, tail
    print(tail[-1500:])
