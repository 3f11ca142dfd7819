"""The serving baseline: a bare FastAPI endpoint that predicts one row with LightGBM.

    BASELINE_MODEL=model.txt BASELINE_ROW=row.npy uvicorn bench.baseline_app:app
"""

from __future__ import annotations

import os

import lightgbm as lgb
import numpy as np
from fastapi import FastAPI

app = FastAPI()
booster = lgb.Booster(model_file=os.environ["BASELINE_MODEL"])
row = np.load(os.environ["BASELINE_ROW"]).reshape(1, -1)


@app.post("/predict")
def predict() -> dict:
    return {"risk": float(booster.predict(row, num_threads=1)[0])}
