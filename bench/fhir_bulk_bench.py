"""Bulk Data NDJSON import: throughput and peak memory (not a timed test).

    python bench/fhir_bulk_bench.py [--patients 100000] [--template 500]

carebundle writes ``--template`` patients of its "mixed" cohort as an export; the export
is then grown to ``--patients`` by copying those patients with new ids (resource ids,
identifiers and references rewritten), as a large system's export would be.  The import
runs in a fresh process (``twincast import fhir DIR --out …``) and its peak resident
memory is read from the kernel; the baseline is the same process merely reading and
JSON-parsing every line (the floor of any importer).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "fhir_bulk"


def make_export(patients: int, template: int) -> Path:
    from carebundle import generate_cohort, to_ndjson

    export = OUT / f"export_{patients}"
    if (export / "done").exists():
        return export
    shutil.rmtree(export, ignore_errors=True)
    export.mkdir(parents=True)
    files = to_ndjson(generate_cohort(count=template, seed=42))
    copies = -(-patients // template)
    for kind, text in files.items():
        lines = text.splitlines()
        with open(export / f"{kind}.ndjson", "w") as fh:
            for k in range(copies):
                tag = f"c{k}-"
                for line in lines:
                    fh.write(_copy(line, tag) + "\n")
    (export / "done").write_text("ok")
    return export


def _copy(line: str, tag: str) -> str:
    """A resource with its id, its identifiers' values and its references renamed."""
    res = json.loads(line)
    if "id" in res:
        res["id"] = tag + res["id"]
    for ident in res.get("identifier", []):
        if "value" in ident:
            ident["value"] = tag + str(ident["value"])

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "reference" and isinstance(v, str) and "/" in v:
                    kind, _, rid = v.partition("/")
                    node[k] = f"{kind}/{tag}{rid}"
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(res)
    return json.dumps(res, separators=(",", ":"))


def run(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of a child process."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    wall = time.perf_counter() - t0
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


PARSE_ONLY = """
import json, sys
from pathlib import Path
n = 0
for f in sorted(Path(sys.argv[1]).glob("*.ndjson")):
    with open(f) as fh:
        for line in fh:
            json.loads(line); n += 1
print(n)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--template", type=int, default=500)
    args = ap.parse_args()
    t0 = time.perf_counter()
    export = make_export(args.patients, args.template)
    size = sum(f.stat().st_size for f in export.glob("*.ndjson"))
    lines = 0
    for f in export.glob("*.ndjson"):
        with open(f) as fh:
            lines += sum(1 for _ in fh)
    print(f"export: {args.patients:,} patients, {lines:,} resources, {size / 2**30:.2f} GiB "
          f"(made in {time.perf_counter() - t0:.0f}s)", flush=True)
    base_s, _ = run([sys.executable, "-c", PARSE_ONLY, str(export)])
    meds = OUT / f"meds_{args.patients}"
    wall, peak = run([str(Path(sys.executable).parent / "twincast"), "import", "fhir",
                      str(export), "--out", str(meds), "--overwrite"])
    import pyarrow.parquet as pq

    events = sum(pq.ParquetFile(f).metadata.num_rows for f in (meds / "data").glob("*.parquet"))
    print(f"read + JSON-parse only: {base_s:.1f}s ({lines / base_s:,.0f} resources/s)")
    print(f"twincast import fhir: {wall:.1f}s ({lines / wall:,.0f} resources/s, "
          f"{events:,} events), {wall / base_s:.1f}x the parse-only floor; "
          f"peak memory {peak:.2f} GiB (bar: 2 GB at 100,000 patients)")


if __name__ == "__main__":
    main()
