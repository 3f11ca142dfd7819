"""CDS Hooks 2.0: a ``patient-view`` service that answers with risk cards.

Discovery lists the service with a prefetch template (the patient and their recent
observations).  A call updates the twin from the prefetched resources, forecasts, and
answers with a card (summary, indicator by the task's alert thresholds, source, markdown
detail with the top contributions).  Without prefetch the twin already in the store is
used, or the answer is 412 as the specification says.  Clients authenticate with a JWT
signed by a registered CDS client (:class:`Verifier`) or with a twincast bearer key.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from serving.core import TwinService
from serving.errors import BadInput, ServingError, Unauthorized
from serving.fhir import bundle_inputs, convert, trajectory_text
from serving.jwtkeys import client_keys
from serving.store.identity import MAX_VALUE, scoped_system
from serving.store.models import CdsFeedback
from serving.store.twins import utcnow
from serving.writes import AccessInfo, Caller

HOOK = "patient-view"


class PreconditionFailed(ServingError):
    http_status = 412
    code = "prefetch_required"


@dataclass
class CdsClient:
    """A caller authenticated by a CDS Hooks JWT (issuer and the JWT's ``tenant``)."""

    issuer: str
    subject: str | None
    tenant: str | None = None

    @property
    def name(self) -> str:
        return f"cds:{self.issuer}"

    @property
    def sender(self) -> str:
        """Who names this client's patients: the issuer, within its tenant."""
        return self.name if not self.tenant else f"{self.name}|{self.tenant}"


def service_id(service: TwinService) -> str:
    return f"twincast-{service.task_name}"


def discovery(service: TwinService) -> dict[str, Any]:
    sid = service_id(service)
    return {"services": [{
        "hook": HOOK, "id": sid,
        "title": f"twincast {service.task_name} risk",
        "description": f"Risk forecast of the patient's digital twin ({sid}); associational, "
                       "for decision support next to clinical judgement.",
        "prefetch": {
            "patient": "Patient/{{context.patientId}}",
            "observations": "Observation?subject={{context.patientId}}&_sort=-date&_count=500",
        },
    }]}


MAX_TOKEN_LIFETIME = 300  # seconds from iat to exp (CDS Hooks 2.0: at most 5 minutes)
LEEWAY = 60  # seconds of clock skew allowed on iat, exp and nbf


class Verifier:
    """CDS Hooks 2.0 JWT checks for the registered clients (keys parsed at start).

    A token is accepted once: its issuer is a registered client, its signature verifies
    with that client's key (by ``kid`` for a JWKS) and one of its algorithms, its
    audience is the endpoint being called (built from the configured public URL), it
    carries ``iss``, ``aud``, ``exp``, ``iat`` and ``jti``, lives at most five minutes,
    is current within a minute's leeway, and its (issuer, jti) has not been seen."""

    def __init__(self, clients: dict[str, Any], replay: Any):
        self.keys = {iss: client_keys(cfg) for iss, cfg in clients.items()}
        self.replay = replay

    def verify(self, token: str, audience: str) -> CdsClient:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthorized("the bearer token is neither a twincast key nor a JWT") from None
        iss = unverified.get("iss")
        keys = self.keys.get(iss) if isinstance(iss, str) else None
        if keys is None:
            raise Unauthorized("the JWT's issuer is not a registered CDS client")
        if header.get("alg") not in keys.algorithms:
            raise Unauthorized("the JWT's algorithm is not one this client registered")
        key = keys.key_for(header.get("kid"))
        if key is None:
            raise Unauthorized("the JWT's kid names none of this client's keys")
        try:
            claims = jwt.decode(token, key, algorithms=[header["alg"]],
                                audience=audience, issuer=iss, leeway=LEEWAY,
                                options={"require": ["iss", "aud", "exp", "iat", "jti"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the JWT has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("the JWT's audience is not this CDS service endpoint") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the JWT is not valid yet (iat or nbf in the future)") from None
        except (jwt.PyJWTError, TypeError, ValueError, AttributeError) as exc:
            # a key of another type than the algorithm (an RSA kid with ES384) is refused
            raise Unauthorized(f"the JWT does not verify ({type(exc).__name__})") from None
        exp, iat, jti = claims["exp"], claims["iat"], claims["jti"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool)
                   for v in (exp, iat)):
            raise Unauthorized("the JWT's exp and iat must be numbers (seconds)")
        if not isinstance(jti, str) or not jti or len(jti) > 255:
            raise Unauthorized("the JWT's jti must be a string of 1 to 255 characters")
        if exp - iat > MAX_TOKEN_LIFETIME:
            raise Unauthorized(f"the JWT lives longer than {MAX_TOKEN_LIFETIME} seconds")
        until = datetime.fromtimestamp(exp + LEEWAY, UTC).replace(tzinfo=None)
        if not self.replay.take(iss, jti, until):
            raise Unauthorized("the JWT was used before (replayed jti)")
        tenant = claims.get("tenant")
        return CdsClient(iss, claims.get("sub"), tenant if isinstance(tenant, str) else None)


def _prefetch_bundle(prefetch: Any, patient_id: str) -> dict[str, Any] | None:
    if not isinstance(prefetch, dict):
        raise BadInput("prefetch must be an object", ["body", "prefetch"])
    patient = prefetch.get("patient")
    if patient is None:
        return None
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        raise BadInput("prefetch.patient must be a FHIR Patient", ["body", "prefetch",
                                                                   "patient"])
    if str(patient.get("id")) != patient_id:
        raise BadInput("the prefetched Patient is not context.patientId",
                       ["body", "prefetch", "patient", "id"])
    entries = [{"fullUrl": f"Patient/{patient.get('id')}", "resource": patient}]
    obs = prefetch.get("observations")
    if obs is not None:
        if not isinstance(obs, dict) or obs.get("resourceType") != "Bundle" or not \
                isinstance(obs.get("entry", []) or [], list):
            raise BadInput("prefetch.observations must be a FHIR Bundle with an entry list",
                           ["body", "prefetch", "observations"])
        entries += [e for e in obs.get("entry") or [] if isinstance(e, dict)]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def call_service(service: TwinService, request: dict[str, Any], caller: Caller,
                 sender: str, access: AccessInfo) -> dict[str, Any]:
    """Handle one ``patient-view`` call and return the cards.  ``sender`` scopes the ids
    that only mean something to the caller (the CDS patient id, a Patient's logical id,
    identifiers without a system): a key's name, or a CDS client's issuer and tenant."""
    started = time.perf_counter()
    patient_id = str((request.get("context") or {}).get("patientId"))
    if len(patient_id) > MAX_VALUE:
        raise BadInput(f"context.patientId is longer than {MAX_VALUE} characters",
                       ["body", "context", "patientId"])
    cds_ident = (scoped_system("cds-patient", sender), patient_id)
    prefetch = request.get("prefetch")
    bundle = _prefetch_bundle({} if prefetch is None else prefetch, patient_id)
    if bundle is not None:
        result = convert(bundle)
        inputs = bundle_inputs(result, sender)
        inp = inputs[0]
        inp.identifiers = (*inp.identifiers, cds_ident)
        outcome = service.writer.write([inp], caller, access)[0]
        sid, forecast = outcome.subject_id, outcome.forecast
    else:
        with service.store.read() as s:
            sid = service.store.identities.lookup(s, [cds_ident]).get(cds_ident)
        if sid is None:
            raise PreconditionFailed(
                "no prefetch and no twin for this patient: send the 'patient' and "
                "'observations' prefetch")
        forecast = service.current_forecast(sid)
    card = _card(service, forecast)
    elapsed = (time.perf_counter() - started) * 1000
    return {"cards": [card], "twincast": {"subject_id": sid,
                                          "forecast_id": forecast["forecast_id"],
                                          "elapsed_ms": round(elapsed, 1)}}


def indicator(task: Any, risks: dict[str, float]) -> str:
    """The card's indicator by the task's alert thresholds (the care team's alerts use
    the same): critical when a horizon's risk reaches its threshold, warning when it
    reaches its warning level, else info.

    >>> from features.task import parse_task
    >>> t = parse_task({"name": "x", "outcome": {"codes": ["DX//X"]}, "horizons_days": [365],
    ...                 "alerts": {"thresholds": [{"horizon_days": 365, "threshold": 0.2,
    ...                                            "warning": 0.05}]}})
    >>> indicator(t, {"365d": 0.21}), indicator(t, {"365d": 0.06}), indicator(t, {"365d": 0.01})
    ('critical', 'warning', 'info')
    """
    levels = task.alert_thresholds()
    out = "info"
    for key, risk in risks.items():
        level = levels.get(int(key.removesuffix("d")))
        if level is None:
            continue
        if risk >= level.threshold:
            return "critical"
        if level.warning is not None and risk >= level.warning:
            out = "warning"
    return out


def _card(service: TwinService, fc: dict[str, Any]) -> dict[str, Any]:
    task = service.task_name
    model = fc["model"]
    source = {"label": "twincast", "topic": {"system": "urn:twincast:model",
                                             "code": f"{model['name']}/{model['version']}",
                                             "display": f"{model['name']} v{model['version']}"}}
    if fc["status"] != "ok":
        return {"uuid": str(uuid.uuid4()), "summary": f"{task} risk not available"[:140],
                "indicator": "info", "source": source,
                "detail": f"Not eligible for a forecast: {fc['reason']}."}
    risks = fc["risks"] or {}
    summary = f"{task.upper()} risk " + ", ".join(f"{v:.0%} in {k.removesuffix('d')} days"
                                                  for k, v in risks.items())
    lines = [f"**{summary}** (as of {fc['as_of'][:10]}, model {model['name']} "
             f"version {model['version']}).", "", "Top contributions (associational, "
             "raw model scale):", ""]
    lines += [f"- {c['text']}" for c in (fc["contributions"] or [])[:5]]
    paths = fc.get("trajectories") or []
    if paths:
        lines += ["", "Where it is heading (forecasts, not measurements):", ""]
        lines += [f"- {trajectory_text(t)}" for t in paths]
    as_of = datetime.fromisoformat(fc["as_of"].replace("Z", "+00:00")).replace(tzinfo=None)
    now = utcnow()
    current = {k: v for k, v in risks.items()
               if as_of + timedelta(days=int(k.removesuffix("d"))) > now}
    for k in risks:
        if k not in current:  # an old forecast never passes for a current one
            ended = as_of + timedelta(days=int(k.removesuffix("d")))
            lines += ["", f"The {k.removesuffix('d')}-day forecast's window ended on "
                      f"{ended:%Y-%m-%d}: it is not a current risk."]
    return {"uuid": str(uuid.uuid4()), "summary": summary[:140],
            "indicator": indicator(service.models.current().bundle.task, current),
            "source": source, "detail": "\n".join(lines)}


def store_feedback(service: TwinService, service_id: str, body: dict[str, Any],
                   client: str) -> int:

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
        rows.append(CdsFeedback(time=utcnow(), service_id=service_id, card=f["card"][:64],
                                outcome=f["outcome"], override_reason=f.get("overrideReason"),
                                outcome_time=when, client=client))
    with service.store.write() as s:
        s.add_all(rows)
    return len(rows)
