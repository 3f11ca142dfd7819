"""Long CSV and wide per-visit imports, with errors that name file, line and column."""

from __future__ import annotations

import pandas as pd
import pytest

from features.errors import DataValidationError
from features.importers import WideMapping, import_long_csv, import_wide

GOOD = """subject_id,time,code,numeric_value,text_value
2,2020-03-01T10:00:00,LAB//EGFR,41.5,
1,2020-01-01T10:00:00+01:00,LAB//EGFR,50,
1,,GENDER//F,,
1,2020-02-01,DX//DIABETES,,type 2
"""


def csv(tmp_path, text: str):
    p = tmp_path / "events.csv"
    p.write_text(text)
    return p


def test_long_csv_imports_sorted_and_in_utc(tmp_path):
    ev = import_long_csv(csv(tmp_path, GOOD))
    assert ev["subject_id"].tolist() == [1, 1, 1, 2]
    assert ev["code"].astype(str).tolist()[0] == "GENDER//F"
    assert ev["time"].iloc[1] == pd.Timestamp("2020-01-01T09:00")  # +01:00 → UTC
    assert ev["text_value"].iloc[2] == "type 2"


@pytest.mark.parametrize(
    ("line", "column", "needle"),
    [
        ("3,2020-13-45,LAB//EGFR,1,", "time", "unparseable time"),
        ("3,2020-01-01,LAB//EGFR,abc,", "numeric_value", "not a number"),
        ("3,2020-01-01,LAB//EGFR,nan,", "numeric_value", "non-finite"),
        ("3,2020-01-01,LAB//EGFR,inf,", "numeric_value", "non-finite"),
        ("x,2020-01-01,LAB//EGFR,1,", "subject_id", "not an integer"),
        ("3,2999-01-01,LAB//EGFR,1,", "time", "future"),
        ("3,2020-01-01,,1,", "code", "empty or null code"),
    ],
)
def test_each_csv_error_names_file_line_and_column(tmp_path, line, column, needle):
    with pytest.raises(DataValidationError) as info:
        import_long_csv(csv(tmp_path, GOOD + line + "\n"))
    err = info.value
    assert err.line == 6 and err.column == column and needle in str(err)
    assert "events.csv" in str(err) and "line 6" in str(err)
    if column != "subject_id":
        assert err.subject_id == 3


def test_csv_missing_column(tmp_path):
    with pytest.raises(DataValidationError, match=r"missing column.*numeric_value"):
        import_long_csv(csv(tmp_path, "subject_id,time,code\n1,2020-01-01,A//B\n"))


def test_wide_table_with_mapping(tmp_path):
    (tmp_path / "visits.csv").write_text(
        "pid,date,egfr,smoker,sex\n1,2020-01-01,40,yes,f\n1,2020-06-01,,no,f\n2,2020-02-01,55,,m\n")
    mapping = WideMapping.model_validate({
        "subject_id": "pid", "time": "date",
        "columns": {"egfr": {"code": "LAB//EGFR", "unit": "ml/min"},
                    "smoker": {"code": "SOCIAL//SMOKER", "kind": "flag"},
                    "sex": {"code": "GENDER//", "kind": "prefix", "static": True}}})
    ev = import_wide(tmp_path / "visits.csv", mapping)
    got = [(r.subject_id, str(r.code), r.numeric_value) for r in ev.itertuples()]
    assert got[0] == (1, "GENDER//f", got[0][2]) and pd.isna(ev["time"].iloc[0])
    assert sum(c == "LAB//EGFR" for _, c, _ in got) == 2  # the empty cell is no event
    assert sum(c == "SOCIAL//SMOKER" for _, c, _ in got) == 1  # 'no' is no event
    assert mapping.units() == {"LAB//EGFR": "ml/min"}


def test_wide_bad_flag_names_line(tmp_path):
    (tmp_path / "v.csv").write_text("subject_id,time,f\n1,2020-01-01,maybe\n")
    m = WideMapping.model_validate({"columns": {"f": {"code": "X//F", "kind": "flag"}}})
    with pytest.raises(DataValidationError, match=r"line 2.*column 'f'.*yes/no"):
        import_wide(tmp_path / "v.csv", m)


def test_wide_mapping_rejects_unknown_keys(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("columns:\n  egfr: {code: LAB//EGFR, colour: red}\n")
    with pytest.raises(DataValidationError, match="colour"):
        WideMapping.load(p)
