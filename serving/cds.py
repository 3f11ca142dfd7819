"""CDS Hooks 2.0: a ``patient-view`` service that answers with risk cards.

Discovery lists the service with a prefetch template (the patient and their recent
observations).  A call updates the twin from the prefetched resources, forecasts, and
answers with a card (summary, indicator by configured thresholds, source, markdown
detail with the top contributions).  Without prefetch the twin already in the store is
used, or the answer is 412 as the specification says.  Clients authenticate with a JWT
signed by a registered CDS client (issuer, audience, expiry and signature checked against
that client's public key) or with a twincast bearer key.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt

from serving.core import Caller, TwinCore
from serving.errors import ServingError, Unauthorized

HOOK = "patient-view"
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")


class PreconditionFailed(ServingError):
    http_status = 412
    code = "prefetch_required"


@dataclass
class CdsClient:
    """A caller authenticated by a CDS Hooks JWT."""

    issuer: str
    subject: str | None

    @property
    def name(self) -> str:
        return f"cds:{self.issuer}"


def service_id(core: TwinCore) -> str:
    return f"twincast-{core.source.task_name}"


def discovery(core: TwinCore) -> dict[str, Any]:
    sid = service_id(core)
    return {"services": [{
        "hook": HOOK, "id": sid,
        "title": f"twincast {core.source.task_name} risk",
        "description": f"Risk forecast of the patient's digital twin ({sid}); associational, "
                       "for decision support next to clinical judgement.",
        "prefetch": {
            "patient": "Patient/{{context.patientId}}",
            "observations": "Observation?subject={{context.patientId}}&_sort=-date&_count=500",
        },
    }]}


def verify_jwt(token: str, clients: dict[str, dict[str, Any]], audience: str) -> CdsClient:
    """Check a CDS client's JWT: known issuer, signature by its key, audience, expiry."""
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise Unauthorized("the bearer token is neither a twincast key nor a JWT") from None
    iss = unverified.get("iss")
    client = clients.get(iss) if isinstance(iss, str) else None
    if client is None:
        raise Unauthorized("the JWT's issuer is not a registered CDS client")
    try:
        claims = jwt.decode(token, client["public_key"],
                            algorithms=list(client.get("algorithms", JWT_ALGORITHMS)),
                            audience=audience, issuer=iss,
                            options={"require": ["iss", "aud", "exp", "iat", "jti"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the JWT has expired") from None
    except jwt.InvalidAudienceError:
        raise Unauthorized("the JWT's audience is not this CDS service") from None
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"the JWT does not verify ({type(exc).__name__})") from None
    return CdsClient(iss, claims.get("sub"))


def _prefetch_bundle(prefetch: dict[str, Any]) -> dict[str, Any] | None:
    patient = prefetch.get("patient")
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        return None
    entries = [{"fullUrl": f"Patient/{patient.get('id')}", "resource": patient}]
    obs = prefetch.get("observations")
    if isinstance(obs, dict) and obs.get("resourceType") == "Bundle":
        entries += [e for e in obs.get("entry", []) if isinstance(e, dict)]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def call_service(core: TwinCore, request: dict[str, Any], caller: Caller,
                 client_issuer: str, warning: float, critical: float) -> dict[str, Any]:
    """Handle one ``patient-view`` call and return the cards."""
    from serving.api.schemas import ForecastOut
    from serving.fhir import ingest_bundle

    started = time.perf_counter()
    patient_id = (request.get("context") or {}).get("patientId")
    system = f"urn:cds-client:{client_issuer}"
    bundle = _prefetch_bundle(request.get("prefetch") or {})
    if bundle is not None:
        result = ingest_bundle(core, bundle, caller)
        sid = result["patients"][0]["subject_id"]
        with core.store.write() as s:
            core.store.link_identifier(s, system, str(patient_id), sid)
        forecast = result["patients"][0]["forecast"]
    else:
        with core.store.read() as s:
            sid = core.store.subject_for_identifier(s, system, str(patient_id), create=False)
            latest = core.store.latest_forecast(s, sid) if sid is not None else None
        if latest is None:
            raise PreconditionFailed(
                "no prefetch and no twin for this patient: send the 'patient' and "
                "'observations' prefetch")
        from serving.core import forecast_out

        forecast = forecast_out(latest)
    fc = ForecastOut.model_validate(forecast)
    card = _card(core, fc, warning, critical)
    elapsed = (time.perf_counter() - started) * 1000
    return {"cards": [card], "twincast": {"subject_id": sid, "forecast_id": fc.forecast_id,
                                          "elapsed_ms": round(elapsed, 1)}}


def _card(core: TwinCore, fc, warning: float, critical: float) -> dict[str, Any]:
    task = core.source.task_name
    source = {"label": "twincast", "topic": {"system": "urn:twincast:model",
                                             "code": f"{fc.model.name}/{fc.model.version}",
                                             "display": f"{fc.model.name} v{fc.model.version}"}}
    if fc.status != "ok":
        return {"uuid": str(uuid.uuid4()), "summary": f"{task} risk not available"[:140],
                "indicator": "info", "source": source,
                "detail": f"Not eligible for a forecast: {fc.reason}."}
    risks = fc.risks or {}
    top = max(risks.values()) if risks else 0.0
    indicator = "critical" if top >= critical else "warning" if top >= warning else "info"
    summary = f"{task.upper()} risk " + ", ".join(f"{v:.0%} in {k.removesuffix('d')} days"
                                                  for k, v in risks.items())
    lines = [f"**{summary}** (as of {fc.as_of:%Y-%m-%d}, model {fc.model.name} "
             f"version {fc.model.version}).", "", "Top contributions (associational, "
             "raw model scale):", ""]
    lines += [f"- {c.text}" for c in (fc.contributions or [])[:5]]
    return {"uuid": str(uuid.uuid4()), "summary": summary[:140], "indicator": indicator,
            "source": source, "detail": "\n".join(lines)}


def store_feedback(core: TwinCore, service: str, body: dict[str, Any], client: str) -> int:
    from serving.errors import BadInput
    from serving.store.models import CdsFeedback
    from serving.store.repo import utcnow

    items = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise BadInput("expected {'feedback': [{'card', 'outcome', ...}]}", ["body", "feedback"])
    rows = []
    for i, f in enumerate(items):
        if not isinstance(f, dict) or not isinstance(f.get("card"), str) or f.get(
                "outcome") not in ("accepted", "overridden"):
            raise BadInput("each feedback needs a card id and outcome accepted|overridden",
                           ["body", "feedback", i])
        when = None
        if isinstance(f.get("outcomeTimestamp"), str):
            try:
                when = datetime.fromisoformat(f["outcomeTimestamp"].replace("Z", "+00:00"))
                when = when.astimezone(UTC).replace(tzinfo=None)
            except ValueError:
                raise BadInput("outcomeTimestamp is not an ISO 8601 time",
                               ["body", "feedback", i, "outcomeTimestamp"]) from None
        rows.append(CdsFeedback(time=utcnow(), service_id=service, card=f["card"][:64],
                                outcome=f["outcome"], override_reason=f.get("overrideReason"),
                                outcome_time=when, client=client))
    with core.store.write() as s:
        s.add_all(rows)
    return len(rows)
