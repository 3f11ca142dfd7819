"""Reference scores: the 4-variable KFRE as published (checked against an independent
implementation, the ``kfre`` package), defined only where it is, and evaluated beside the
trained model on the same held-out rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.references import NOT_DEFINED, kfre4


def rows(**cols) -> pd.DataFrame:
    base = {"age_years": 60.0, "GENDER//M__static": 1.0, "GENDER//F__static": 0.0,
            "LAB//EGFR__all__last": 30.0, "LAB//EGFR__all__days_since_last": 10.0,
            "LAB//UACR__all__last": 300.0, "LAB//UACR__all__days_since_last": 40.0}
    base.update(cols)
    n = max(len(v) if isinstance(v, list) else 1 for v in base.values())
    return pd.DataFrame({k: v if isinstance(v, list) else [v] * n for k, v in base.items()})


@pytest.mark.parametrize("region", ["north_america", "other"])
@pytest.mark.parametrize("years", [2, 5])
def test_kfre4_agrees_with_an_independent_implementation(region, years):
    import kfre

    rng = np.random.default_rng(5)
    age = rng.uniform(25, 90, 40).round(1)
    male = rng.random(40) < 0.5
    egfr = rng.uniform(10, 59.9, 40).round(1)
    uacr = np.exp(rng.uniform(np.log(3), np.log(3000), 40)).round(1)
    got = kfre4(rows(**{"age_years": age.tolist(), "GENDER//M__static": (male * 1.0).tolist(),
                        "GENDER//F__static": ((~male) * 1.0).tolist(),
                        "LAB//EGFR__all__last": egfr.tolist(),
                        "LAB//UACR__all__last": uacr.tolist()}), 365 * years, region)
    assert got.defined.all()
    want = [kfre.kfre_person(a, bool(m), e, u, region == "north_america", years=years)
            for a, m, e, u in zip(age, male, egfr, uacr, strict=True)]
    np.testing.assert_allclose(got.risk, want, rtol=1e-9)


def test_kfre4_is_not_defined_outside_its_population_or_horizons():
    r = kfre4(rows(**{"LAB//EGFR__all__last": [30.0, 65.0, 30.0, 30.0, 8.0, 30.0],
                      "LAB//EGFR__all__days_since_last": [10.0, 10.0, 400.0, 10.0, 10.0, 10.0],
                      "LAB//UACR__all__last": [300.0, 300.0, 300.0, np.nan, 300.0, 300.0],
                      "GENDER//M__static": [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
                      "GENDER//F__static": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]}), 730)
    # eGFR 65 (not CKD G3-5), a year-old eGFR, no UACR, eGFR 8, sex unknown
    assert r.defined.tolist() == [True, False, False, False, False, False]
    assert np.isnan(r.risk[1:]).all() and 0 < r.risk[0] < 1
    one_year = kfre4(rows(), 365)
    assert not one_year.defined.any() and "2 and 5 years" in one_year.why
    lacking = kfre4(rows().drop(columns=["LAB//UACR__all__last"]), 730)
    assert not lacking.defined.any() and "LAB//UACR__all__last" in lacking.why
    # one sex code only: a patient without it is not known to be of the other sex
    one_sex = kfre4(rows(**{"GENDER//M__static": [1.0, 0.0]}).drop(
        columns=["GENDER//F__static"]), 730)
    assert not one_sex.defined.any() and "GENDER//F__static" in one_sex.why
    child = kfre4(rows(age_years=12.0), 730)
    assert not child.defined.any()


def test_a_uacr_in_another_unit_is_refused():
    from features.task import parse_task
    from training.references import check_units

    task = parse_task({"name": "t", "outcome": {"codes": ["DX//ESKD"]},
                       "horizons_days": [730], "references": [{"name": "kfre4"}]})
    check_units(task, {"LAB//UACR": "mg/g"})
    with pytest.raises(ValueError, match="mg/mmol"):
        check_units(task, {"LAB//UACR": "mg/mmol"})


def test_the_kfre_is_reported_beside_the_model_on_the_same_rows(trained, tracker):
    """Training evaluates the task's reference on the held-out rows where it is defined:
    the same metrics with intervals for it and for the model, their paired difference,
    'not defined' at one year; in MLflow, never registered."""
    refs = trained.references["kfre4"]
    assert refs["horizons"]["365"]["result"] == NOT_DEFINED
    two = refs["horizons"]["730"]
    assert two.get("result") != NOT_DEFINED, two
    assert 0 < two["rows"] < len(trained.heldout_rows)
    for who in ("reference", "model"):
        ci = two[who]["auroc"]
        assert 0.5 < ci["estimate"] <= 1 and ci["lower"] <= ci["estimate"] <= ci["upper"]
    d = two["model_minus_reference_auroc"]
    assert d["estimate"] == pytest.approx(two["model"]["auroc"]["estimate"]
                                          - two["reference"]["auroc"]["estimate"])
    client = tracker.client
    run = client.get_run(trained.parent_run_id)
    assert run.data.metrics["reference_kfre4_auroc_730d"] == two["reference"]["auroc"]["estimate"]
    path = client.download_artifacts(trained.parent_run_id, "references.json")
    assert json.loads(Path(path).read_text())["kfre4"]["horizons"]["365"]["result"] == NOT_DEFINED
