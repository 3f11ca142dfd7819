"""A small bounded HTTP load generator (keep-alive connections, fixed concurrency).

    python bench/loadgen.py URL --method GET --concurrency 16 --requests 4000 \
        [--header "Authorization: Bearer ..."] [--bodies file.jsonl] [--paths file.txt]

Prints one JSON line: count, errors, wall time, throughput and latency percentiles (ms).
Each worker owns one connection; requests stop at --requests or --seconds, whichever
comes first.  Run it pinned to the other core (``taskset -c 1``) so it does not steal
the service's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

import httpx
import numpy as np


async def run(args) -> dict:
    headers = dict(h.split(": ", 1) for h in args.header)
    from pathlib import Path

    bodies = ([line.encode() for line in Path(args.bodies).read_text().splitlines()]
              if args.bodies else [None])
    paths = [p.strip() for p in Path(args.paths).read_text().splitlines()] if args.paths else [""]
    counter = itertools.count()
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + args.seconds
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while True:
            i = next(counter)
            if i >= args.requests or time.perf_counter() > deadline:
                return
            body = bodies[i % len(bodies)]
            path = paths[i % len(paths)]
            t0 = time.perf_counter()
            try:
                r = await client.request(args.method, args.url + path, content=body,
                                         headers=headers)
                if r.status_code >= 400:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            lat.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        # warm the connections
        await asyncio.gather(*[client.request(args.method, args.url + paths[0],
                                              content=bodies[0], headers=headers)
                               for _ in range(args.concurrency)])
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(args.concurrency)])
        wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"count": len(lat), "errors": errors, "wall_s": wall, "rps": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "over_100ms": float((ms > 100).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--method", default="GET")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--bodies")
    ap.add_argument("--paths")
    print(json.dumps(asyncio.run(run(ap.parse_args()))))


if __name__ == "__main__":
    main()
