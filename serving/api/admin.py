"""The model, admin and audit routes."""

from __future__ import annotations

from datetime import date, datetime, time
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response

from serving.api import schemas as S
from serving.api.deps import Principal, Service, require
from serving.api.responses import ERRORS, NOT_FOUND, json_response
from serving.errors import BadInput
from serving.states import Action

router = APIRouter()


@router.get("/v1/model", response_model=S.ModelOut, tags=["model"], responses={**ERRORS})
def model(service: Service,
          _: Annotated[Principal, Depends(require(Action.READ_TWINS, "read_model"))]) -> dict:
    """The served model: name, version, run, digests, metrics, when it was loaded."""
    return service.model_info()


@router.post("/v1/admin/reload", response_model=S.ReloadOut, tags=["admin"],
             responses={**ERRORS})
def reload(service: Service,
           _: Annotated[Principal, Depends(require(Action.ADMINISTER, "reload"))]) -> dict:
    """Load the current champion; if it changed, re-forecast every twin (background)."""
    return service.reload("admin reload")


@router.get("/v1/admin/refresh", response_model=S.RefreshOut | None, tags=["admin"],
            responses={**ERRORS})
def refresh(service: Service,
            _: Annotated[Principal, Depends(require(Action.ADMINISTER, "refresh"))]):
    """Progress of the latest re-forecast job."""
    return service.refresh_status()


DAY = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"


@router.get("/v1/monitoring", tags=["monitoring"], responses={**ERRORS})
def monitoring(service: Service,
               _: Annotated[Principal, Depends(require(Action.MONITOR, "read_monitoring"))],
               since: Annotated[str | None, Query(
                   pattern=DAY, json_schema_extra={"format": "date"},
                   description="first as-of day (UTC, YYYY-MM-DD) of the forecasts to judge")
               ] = None,
               until: Annotated[str | None, Query(
                   pattern=DAY, json_schema_extra={"format": "date"},
                   description="the day after the last one (YYYY-MM-DD)")] = None,
               window_days: Annotated[int | None, Query(ge=7, le=36_500)] = None) -> Response:
    """Does the served model keep its promise?  Per model version and window of as-of
    times: realised metrics on matured forecasts beside the held-out ones, metrics
    *expected if calibration holds* on all of them, drift against the reference stored
    with the version, event volume per code, this computation's alerts and the alerts
    stored by monitoring runs (``twincast monitor``).  Auditors and admins.  A span that
    holds no day (``until`` not after ``since``) holds no forecast: the answer says so."""
    first, last = _day(since, "since"), _day(until, "until")
    return json_response(service.monitoring(first, last, window_days))


def _day(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.combine(date.fromisoformat(text), time.min)
    except ValueError:
        raise BadInput(f"{name} is not a calendar day (YYYY-MM-DD)", ["query", name]) from None


@router.get("/v1/access-log", response_model=list[S.AccessOut], tags=["audit"],
            responses={**ERRORS})
def access_log(service: Service,
               _: Annotated[Principal, Depends(require(Action.AUDIT, "read_access_log"))],
               subject_id: Annotated[int | None, Query(ge=0, le=2**53 - 1)] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list:
    """Who read or wrote which twin, when, through which key (names, never secrets)."""
    return service.access_log(subject_id, limit)


@router.get("/v1/audit/forecasts/{forecast_id}", tags=["audit"],
            responses={**ERRORS, **NOT_FOUND})
def audit(forecast_id: Annotated[str, Path(min_length=1, max_length=64)], service: Service,
          _: Annotated[Principal, Depends(require(Action.AUDIT, "audit_forecast"))]) -> dict:
    """The chain behind one forecast — model version, run, data, digests, code — with
    every link verified, including reproducing the forecast bit for bit."""
    return service.audit(forecast_id)
