"""Serving baselines: bare FastAPI endpoints predicting one row with LightGBM — alone, and
also reading a twin's row and committing an access-log row on the same database (the
database work a twincast GET does), with SQLAlchemy Core.

    BASELINE_MODEL=model.txt BASELINE_ROW=row.npy [BASELINE_DB=url] uvicorn bench.baseline_app:app
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import lightgbm as lgb
import numpy as np
from fastapi import FastAPI, Response
from sqlalchemy import create_engine, text

app = FastAPI()
booster = lgb.Booster(model_file=os.environ["BASELINE_MODEL"])
row = np.load(os.environ["BASELINE_ROW"]).reshape(1, -1)
url = os.environ.get("BASELINE_DB", "")
if url.startswith("postgresql://"):
    url = "postgresql+psycopg://" + url[len("postgresql://"):]
engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}
                       if url.startswith("sqlite") else {}) if url else None


@app.post("/predict")
def predict() -> dict:
    return {"risk": float(booster.predict(row, num_threads=1)[0])}


@app.get("/twin/{subject_id}")
def twin(subject_id: int) -> Response:
    risk = float(booster.predict(row, num_threads=1)[0])
    with engine.begin() as conn:
        view = conn.execute(text("SELECT view FROM twins WHERE subject_id = :s"),
                            {"s": subject_id}).scalar_one_or_none()
        conn.execute(text(
            "INSERT INTO access_log (time, method, path, action, subject_id, status_code) "
            "VALUES (:t, 'GET', '/twin', 'baseline', :s, 200)"),
            {"t": datetime.now(UTC).replace(tzinfo=None), "s": subject_id})
    return Response((view or "{}")[:-1] + f',"baseline_risk":{risk}}}',
                    media_type="application/json")
