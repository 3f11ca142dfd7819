"""A straightforward pandas implementation of twincast's features: the benchmark baseline.

Merge each prediction row with its subject's events, keep those at or before *t*, and
``groupby(row, code).agg`` per window.  It computes the same features as
``features.featurize.build_features`` (the benchmark checks a sample of them agree).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.spec import FeatureSpec
from features.timeindex import DAYS_PER_YEAR


def pandas_features(events: pd.DataFrame, rows: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """Features for ``rows`` (subject_id, prediction_time), columns ``spec.feature_names``."""
    rows = rows[["subject_id", "prediction_time"]].reset_index(drop=True)
    rows["row"] = np.arange(len(rows))
    out = pd.DataFrame(index=rows["row"], columns=spec.feature_names, dtype=np.float64)
    ev = events.assign(code=events["code"].astype(str))
    birth = ev[ev["code"] == "MEDS_BIRTH"].groupby("subject_id")["time"].first()
    age = rows["prediction_time"] - rows["subject_id"].map(birth)
    out["age_years"] = (age.dt.total_seconds() / 86400 / DAYS_PER_YEAR).to_numpy()
    kinds = {c.code: c for c in spec.codes}
    static = ev[ev["time"].isna() & ev["code"].isin([c for c, f in kinds.items()
                                                     if f.kind == "static"])]
    for code, group in static.groupby("code"):
        name = spec.static_name(code)
        if kinds[code].numeric:
            out[name] = rows["subject_id"].map(group.groupby("subject_id")["numeric_value"]
                                               .first()).to_numpy()
        else:
            out[name] = rows["subject_id"].isin(group["subject_id"]).astype(float).to_numpy()
    for code, f in kinds.items():
        if f.kind == "static" and code not in set(static["code"]):
            out[spec.static_name(code)] = np.nan if f.numeric else 0.0
    timed = ev[ev["time"].notna() & ev["code"].isin([c for c, f in kinds.items()
                                                     if f.kind != "static"])]
    m = rows.merge(timed, on="subject_id")
    m = m[m["time"] <= m["prediction_time"]]
    numeric_codes = [c for c, f in kinds.items() if f.kind == "numeric"]
    m = m[~(m["code"].isin(numeric_codes) & m["numeric_value"].isna())]
    m["age_days"] = (m["prediction_time"] - m["time"]).dt.total_seconds() / 86400
    m["x"] = m["time"].astype("int64") / 86_400e6 / DAYS_PER_YEAR
    for code in [c for c, f in kinds.items() if f.kind == "categorical"]:
        out[spec.feature_name(code, None, "ever")] = 0.0
    cat = m[~m["code"].isin(numeric_codes)]
    g = cat.groupby(["row", "code"])
    per = pd.DataFrame({"ever": g.size() > 0, "days_since_first": g["age_days"].max()})
    for agg in ("ever", "days_since_first"):
        wide = per[agg].unstack("code")
        for code in wide.columns:
            col = wide[code].astype(float)
            out.loc[wide.index, spec.feature_name(code, None, agg)] = (
                col.fillna(0.0) if agg == "ever" else col)
    num = m[m["code"].isin(numeric_codes)].copy()
    num["xy"] = num["x"] * num["numeric_value"]
    num["xx"] = num["x"] * num["x"]
    for window, days in zip(spec.windows, spec.window_days, strict=True):
        cw = cat[cat["age_days"] < days]
        counts = cw.groupby(["row", "code"]).size().unstack("code")
        for code in [c for c, f in kinds.items() if f.kind == "categorical"]:
            col = counts[code] if code in counts else pd.Series(dtype=float)
            out[spec.feature_name(code, window, "count")] = col.reindex(out.index).fillna(0)
        nw = num[num["age_days"] < days]
        g = nw.groupby(["row", "code"])
        a = g.agg(last=("numeric_value", "last"), mean=("numeric_value", "mean"),
                  min=("numeric_value", "min"), max=("numeric_value", "max"),
                  std=("numeric_value", "std"), count=("numeric_value", "size"),
                  days_since_last=("age_days", "min"), sx=("x", "sum"), sy=("numeric_value", "sum"),
                  sxy=("xy", "sum"), sxx=("xx", "sum"), distinct=("time", "nunique"))
        n = a["count"]
        den = a["sxx"] - a["sx"] ** 2 / n
        a["slope"] = ((a["sxy"] - a["sx"] * a["sy"] / n) / den).where(a["distinct"] >= 2)
        for agg in spec.numeric_aggregations:
            wide = a[agg].unstack("code")
            for code in numeric_codes:
                col = wide[code] if code in wide else pd.Series(dtype=float)
                col = col.reindex(out.index)
                if agg == "count":
                    col = col.fillna(0)
                out[spec.feature_name(code, window, agg)] = col.to_numpy()
    return out.astype(np.float32)
