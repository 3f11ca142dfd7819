"""Feature names in plain words, for explanations a clinician can read.

>>> describe_feature("LAB//EGFR__365d__last", "ml/min/1.73m²")
'EGFR, last value in 365 days'
>>> describe_value("LAB//EGFR__365d__last", 24.0, "ml/min/1.73m²")
'24 ml/min/1.73m²'
"""

from __future__ import annotations

_AGG = {
    "last": "last value", "mean": "mean", "min": "lowest value", "max": "highest value",
    "std": "variability (SD)", "count": "number of records", "slope": "trend per year",
    "days_since_last": "days since last record", "ever": "ever recorded",
    "days_since_first": "days since first record", "static": "recorded",
    "first": "first value", "change_since_first": "change since the first value",
    "change_since_previous": "change since the previous value",
    "time_weighted_mean": "time-weighted mean", "theil_sen_slope": "robust trend per year",
    "level": "smoothed level", "trend": "smoothed trend per year",
}
_PER_YEAR = ("slope", "theil_sen_slope", "trend")


def _code_words(code: str) -> str:
    vocab, _, value = code.partition("//")
    if not value:
        return code.replace("_", " ").lower()
    words = value.replace("_", " ")
    return {"GENDER": f"sex {words.lower()}", "RX": f"{words.lower()} medication",
            "DX": f"diagnosis {words.lower()}"}.get(vocab, words)


def describe_feature(name: str, unit: str | None = None) -> str:
    if name == "age_years":
        return "age"
    parts = name.split("__")
    code, agg = parts[0], parts[-1]
    window = parts[1] if len(parts) == 3 else None
    text = f"{_code_words(code)}, {_AGG.get(agg, agg)}"
    if window == "kalman":
        text = f"{_code_words(code)}, {_AGG.get(agg, agg)} (Kalman filter)"
        text = text.replace("smoothed ", "filtered ")
    elif window and window.startswith("ewm"):
        text += f" (half-life {window[3:].replace('d', ' days')})"
    elif window:
        text += " in all history" if window == "all" else f" in {window.replace('d', ' days')}"
    return text.replace(" 1 days", " 1 day")


def describe_value(name: str, value: float | None, unit: str | None = None) -> str:
    if value is None or value != value:
        return "missing"
    agg = name.split("__")[-1]
    if name == "age_years":
        return f"{value:.0f} years"
    if agg in ("ever", "static") and value in (0.0, 1.0):
        return "yes" if value == 1.0 else "no"
    if agg in ("count",):
        return f"{value:.0f}"
    if agg.startswith("days_since"):
        return f"{value:.0f} days"
    shown = f"{value:.3g}"
    if agg in _PER_YEAR or name.endswith("__kalman__slope"):
        return f"{shown} {unit or 'units'}/year"
    if agg == "std":
        return f"{shown} {unit or ''}".strip()
    return f"{shown} {unit}".strip() if unit else shown
