"""The BentoML latency tail, reproduced and removed (not a timed test).

Starts a trivial BentoML 1.4 service (one async route, one worker, pinned to core 0)
twice — as shipped, then with twincast's fix (serving/runtime.py) — loads it from core
1 with ``hey`` (or wrk), and prints latency and the worker's live object count.

    python bench/bento_tail.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SERVICE = '''
import gc, os, sys
from collections import Counter
sys.path.insert(0, {root!r})
import bentoml
from fastapi import FastAPI

app = FastAPI()

@app.get("/ping")
async def ping():
    return {{"ok": 1}}

@app.get("/objects")
def objects():
    gc.collect()
    return {{"live": len(gc.get_objects()),
             "top": Counter(type(o).__name__ for o in gc.get_objects()).most_common(5)}}

@bentoml.service(workers=1, logging={{"access": {{"enabled": False}}}})
@bentoml.asgi_app(app, path="/")
class Tail:
    def __init__(self):
        if os.environ.get("TWINCAST_FIX") == "1":
            from serving.runtime import patch_bentoml_timeout, tune_gc
            patch_bentoml_timeout()
            tune_gc()
'''


def run(fixed: bool, requests: int, port: int, work: Path) -> dict:
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "TWINCAST_FIX": "1" if fixed else "0"}
    with open(work / f"serve-{fixed}.log", "w") as log:
        proc = subprocess.Popen(["taskset", "-c", "0", str(Path(sys.executable).parent /
                                                           "bentoml"), "serve", "tail_svc:Tail",
                                 "--port", str(port)], cwd=work, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(url + "/ping", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        out = subprocess.run(["taskset", "-c", "1", "hey", "-c", "16", "-n", str(requests),
                              url + "/ping"], capture_output=True, text=True).stdout
        grab = lambda pat: float(re.search(pat, out).group(1)) * 1000  # noqa: E731
        live = httpx.get(url + "/objects", timeout=30).json()
        return {"p50": grab(r"50% in ([0-9.]+)"), "p99": grab(r"99% in ([0-9.]+)"),
                "max": grab(r"Slowest:\s+([0-9.]+)"), "rps": float(re.search(
                    r"Requests/sec:\s+([0-9.]+)", out).group(1)), **live}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20_000)
    args = ap.parse_args()
    if not shutil.which("hey"):
        raise SystemExit("needs hey (Debian package 'hey')")
    work = Path(tempfile.mkdtemp(prefix="bento-tail-"))
    (work / "tail_svc.py").write_text(SERVICE.format(root=str(ROOT)))
    for fixed, port in ((False, 3851), (True, 3852)):
        r = run(fixed, args.requests, port, work)
        print(f"{'with the fix' if fixed else 'as shipped  '}: concurrency 16, "
              f"{args.requests:,} requests: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, "
              f"max {r['max']:.0f} ms, {r['rps']:.0f} req/s; live objects after: "
              f"{r['live']:,} (top {r['top'][:3]})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
