"""The care team's pages under ``/ui``: sign-in, the population, a twin's story, alerts.

Each person signs in with their own account (``twincast users create``); the session is
an HttpOnly, SameSite=Strict cookie (Secure when served over HTTPS) that expires, and
that stops working as soon as the account is disabled.  Every form carries a CSRF token
bound to the session (the sign-in form one bound to a cookie of its own).  Roles apply
as on the API (``serving.states``): reading twins for the population and twin pages,
writing twins to acknowledge an alert, the audit trail for the audit page.  Every page
that shows a twin writes its access-log rows, naming the person, before it answers.

Pages are rendered on the server (Jinja2, autoescaped) with SVG charts
(``serving.ui.charts``); the stylesheet is served from here, and nothing is fetched from
anywhere else (the Content-Security-Policy says so to the browser too).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.exc import DataError, DBAPIError
from starlette.datastructures import FormData

from features.describe import describe_value
from serving.api.deps import note_access
from serving.errors import BadInput, Conflict, NotFound, ServingError
from serving.states import Action, may
from serving.store.models import Event
from serving.store.risks import REVIEW, SORTS
from serving.store.twins import utcnow
from serving.store.users import Person
from serving.ui import charts
from serving.views import iso
from serving.writes import AccessInfo, Caller

log = logging.getLogger("twincast.ui")
DIGITS = re.compile(r"[0-9]{1,19}")
FORECAST_ID = re.compile(r"[0-9a-f-]{36}")

HERE = Path(__file__).parent
COOKIE = "twincast_session"
LOGIN_CSRF = "twincast_login"
PAGE_SIZE = 50
HISTORY_LIMIT = 500  # forecasts drawn on a twin's page (the API's largest page)
EVENT_LIMIT = 5000  # numeric measurements drawn per twin
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")

router = APIRouter(include_in_schema=False)
env = Environment(loader=FileSystemLoader(HERE / "templates"),
                  autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def _pct(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:.{digits}%}"


def _day(t: Any) -> str:
    if t is None:
        return "—"
    if isinstance(t, str):
        return t[:10]
    return t.strftime("%Y-%m-%d")


env.filters["pct"] = _pct
env.filters["day"] = _day


class SignInNeeded(Exception):
    pass


class PageRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------ plumbing
def _secure(request: Request) -> bool:
    service = getattr(request.app.state, "service", None)
    public = (service.config.public_url or "") if service is not None else ""
    return request.url.scheme == "https" or public.startswith("https://")


def _headers(resp: Response, secure: bool = False) -> Response:
    if secure:
        resp.headers["Strict-Transport-Security"] = "max-age=31536000"
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["Cache-Control"] = "no-store"  # patient data: never kept by the browser
    resp.headers["X-Frame-Options"] = "DENY"
    return resp


def render(request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
    html = env.get_template(template).render(request=request, **ctx)
    return _headers(HTMLResponse(html, status_code=status), _secure(request))


def _service(request: Request):
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise PageRefused(503, "The service is starting: try again in a moment.")
    return service


def signed_in(request: Request, action: Action, name: str, subject_id: int | None = None
              ) -> tuple[Any, Person, Caller]:
    """The service, the signed-in person and their caller, once their role may do
    ``action`` (noted for the access log as ``name``)."""
    service = _service(request)
    note_access(request, name, subject_id)
    person = service.store.users.session(request.cookies.get(COOKIE, ""),
                                         service.config.ui_idle_minutes)
    if person is None:
        raise SignInNeeded
    caller = Caller(person.name, None, person.role, person.id)
    request.state.access["caller"] = caller
    if not may(person.role, action):
        raise PageRefused(403, f"Your role ({person.role}) may not {action.value}.")
    return service, person, caller


def not_found_page(request: Request) -> Response:
    """A path under /ui that no page serves."""
    return render(request, "error.html", 404, heading="Not found",
                  message="There is no such page.", person=None)


def _guard(request: Request, fn) -> Response:
    """Run a page; sign-in, refusals and errors become pages, never JSON or a 500."""
    try:
        return fn()
    except SignInNeeded:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":  # back to a page, never to a form's action
            target = "/ui/alerts"
        return _headers(RedirectResponse(f"/ui/login?next={quote(target, safe='')}", 303))
    except PageRefused as exc:
        return render(request, "error.html", exc.status, message=exc.message,
                      person=_person_or_none(request))
    except (NotFound, BadInput, Conflict) as exc:
        return render(request, "error.html", exc.http_status, message=str(exc),
                      person=_person_or_none(request))
    except ServingError as exc:
        return render(request, "error.html", exc.http_status, message=str(exc),
                      person=_person_or_none(request))
    except DataError:  # a value the database refuses (a NUL byte): the request's fault
        return render(request, "error.html", 422, heading="Not understood",
                      message="A value in the request cannot be used.", person=None)
    except DBAPIError as exc:
        log.error("database error %s on %s", type(exc.orig).__name__, request.url.path)
        return render(request, "error.html", 503, message="The database is busy or "
                      "unreachable: try again shortly.", person=None)
    except Exception as exc:  # a bug: a page all the same, the log names only the type
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method,
                  request.url.path)
        return render(request, "error.html", 500, message="Something went wrong inside "
                      "the service.", person=None)


def _person_or_none(request: Request) -> Person | None:
    service = getattr(request.app.state, "service", None)
    if service is None:
        return None
    try:
        return service.store.users.session(request.cookies.get(COOKIE, ""),
                                           service.config.ui_idle_minutes)
    except Exception:
        return None


def same(a: str, b: str) -> bool:
    """Constant-time equality of two texts (any characters)."""
    return hmac.compare_digest(a.encode(), b.encode())


def _check_csrf(form: FormData | None, person: Person) -> None:
    if form is None or not same(str(form.get("csrf", "")), person.csrf):
        raise PageRefused(403, "This form has expired or did not come from this site: "
                          "reload the page and try again.")


def _safe_next(target: str | None) -> str:
    """Only a path of these pages (never another host)."""
    if target and target.startswith("/ui/") and not target.startswith("//") \
            and "\\" not in target and "\n" not in target and "\r" not in target:
        return target
    return "/ui/population"


def _access(request: Request, action: str) -> AccessInfo:
    """What this page logs itself, with its reads (the middleware then does not)."""
    info = AccessInfo(request.method, request.url.path, action)
    request.state.access["info"] = info
    return info


def _int(value: str | None, default: int | None, low: int, high: int) -> int | None:
    if value is None or value == "" or not DIGITS.fullmatch(value):
        return default
    return min(max(int(value), low), high)


def _number(value: str | None, low: float, high: float) -> float | None:
    """A decimal from a form ("12.5"), clamped; None when absent or not a number."""
    if not value or len(value) > 20 or not re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        return None
    return min(max(float(value), low), high)


# ------------------------------------------------------------------ sign-in
@router.get("/ui")
@router.get("/ui/")
def home() -> Response:
    return _headers(RedirectResponse("/ui/population", 303))


@router.get("/ui/static/{name}")
def static(name: str) -> Response:
    if name not in ("ui.css",):
        return Response(status_code=404)
    resp = Response((HERE / "static" / name).read_bytes(), media_type="text/css")
    resp.headers["Cache-Control"] = "public, max-age=3600"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _login_page(request: Request, status: int, error: str | None = None,
                next_url: str = "/ui/population") -> Response:
    token = secrets.token_urlsafe(24)
    resp = render(request, "login.html", status, csrf=token, error=error, next=next_url,
                  person=None)
    resp.set_cookie(LOGIN_CSRF, token, httponly=True, samesite="strict",
                    secure=_secure(request), path="/ui", max_age=3600)
    return resp


@router.get("/ui/login")
def login_form(request: Request, next: str | None = None) -> Response:
    return _login_page(request, 200, next_url=_safe_next(next))


class SignInLimits:
    """Sign-in attempts per name and per client address (per worker, in memory), counted
    before the password is checked (a burst cannot slip past); a success takes its own
    back.  Past the limit within the window, sign-in is refused for a while without
    hashing; at most ``HASHING`` argon2 checks run at once (each ~50 ms and 64 MiB) and
    one more is answered "busy" at once rather than holding a thread."""

    WINDOW = 15 * 60
    PER_NAME, PER_ADDRESS, HASHING, KEYS = 5, 20, 2, 50_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str], deque] = OrderedDict()
        self.hashing = threading.BoundedSemaphore(self.HASHING)

    def _count(self, key: tuple[str, str], now: float, add: bool) -> int:
        q = self._seen.get(key)
        if q is None:
            if not add:
                return 0
            q = self._seen[key] = deque()
            while len(self._seen) > self.KEYS:  # the least recently tried go first
                self._seen.popitem(last=False)
        self._seen.move_to_end(key)
        while q and q[0] < now - self.WINDOW:
            q.popleft()
        if add:
            q.append(now)
        return len(q)

    def attempt(self, name: str, address: str) -> bool:
        """Count an attempt; False when the name or the address is over its limit."""
        now = time.monotonic()
        keys = (("name", name[:255].lower()), ("addr", address))
        with self._lock:
            if self._count(keys[0], now, False) >= self.PER_NAME \
                    or self._count(keys[1], now, False) >= self.PER_ADDRESS:
                return False
            for k in keys:
                self._count(k, now, True)
            return True

    def succeeded(self, name: str, address: str) -> None:
        with self._lock:
            self._seen.pop(("name", name[:255].lower()), None)
            q = self._seen.get(("addr", address))
            if q:
                q.pop()


LIMITS = SignInLimits()


def _sign_in(service, request: Request, name: str, password: str):
    """Check a name and password (throttled; failures in the access log, by name)."""
    address = request.client.host if request.client else "?"
    if not LIMITS.hashing.acquire(blocking=False):
        return "busy"
    try:
        if not LIMITS.attempt(name, address):
            return "blocked"
        done = service.store.users.sign_in(name, password, service.config.ui_session_minutes)
    finally:
        LIMITS.hashing.release()
    if done is None:
        from serving.store.access import access_row

        service.store.access.queue(access_row(
            key_id=None, key_name=name[:64] or None, role=None, method="POST",
            path="/ui/login", action="ui_sign_in_failed", subject_id=None, status_code=401))
        return None
    LIMITS.succeeded(name, address)
    old = request.cookies.get(COOKIE, "")
    if old:  # a session already in this browser ends: one person, one session here
        person = service.store.users.session(old, service.config.ui_idle_minutes)
        if person is not None:
            service.store.users.sign_out(person.session_id)
    return done


async def _form(request: Request) -> FormData | None:
    """The posted form, or None when the body is not one (answered as a page)."""
    try:
        return await request.form()
    except Exception:
        return None


@router.post("/ui/login")
async def login(request: Request) -> Response:
    form = await _form(request)
    if form is None:
        return _login_page(request, 400, "The sign-in form did not arrive whole: please "
                           "try again.")
    next_url = _safe_next(str(form.get("next", "")))
    sent = str(form.get("csrf", ""))
    cookie = request.cookies.get(LOGIN_CSRF, "")
    if not cookie or not same(sent, cookie):
        return _login_page(request, 403, "The sign-in form expired: please try again.",
                           next_url)
    name, password = str(form.get("name", "")).strip(), str(form.get("password", ""))
    service = getattr(request.app.state, "service", None)
    if service is None:
        return _login_page(request, 503, "The service is starting: try again in a moment.",
                           next_url)
    import anyio

    try:
        done = await anyio.to_thread.run_sync(_sign_in, service, request, name, password)
    except DBAPIError as exc:
        log.error("database error %s on sign-in", type(exc.orig).__name__)
        return _login_page(request, 503, "The service cannot check sign-ins just now: try "
                           "again shortly.", next_url)
    if done == "blocked":
        return _login_page(request, 429, "Too many failed sign-ins: try again in 15 "
                           "minutes.", next_url)
    if done == "busy":
        return _login_page(request, 503, "The service is busy: try again in a moment.",
                           next_url)
    if done is None:
        return _login_page(request, 401, "Wrong name or password, or the account is "
                           "disabled.", next_url)
    token, _ = done
    resp = _headers(RedirectResponse(next_url, 303), _secure(request))
    resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=_secure(request),
                    path="/ui", max_age=int(service.config.ui_session_minutes * 60))
    resp.delete_cookie(LOGIN_CSRF, path="/ui")
    return resp


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    form = await _form(request)

    def work() -> Response:
        service, person, _ = signed_in(request, Action.READ_TWINS, "ui_sign_out")
        _check_csrf(form, person)
        service.store.users.sign_out(person.session_id)
        resp = _headers(RedirectResponse("/ui/login", 303))
        resp.delete_cookie(COOKIE, path="/ui")
        return resp

    import anyio

    return await anyio.to_thread.run_sync(_guard, request, work)


# ------------------------------------------------------------------ population
@router.get("/ui/population")
def population(request: Request) -> Response:
    def work() -> Response:
        service, person, caller = signed_in(request, Action.READ_TWINS, "ui_population")
        model = service.models.current_served()
        q = request.query_params
        horizons = list(model.bundle.horizons)
        horizon = _int(q.get("horizon"), model.bundle.task.primary_horizon, 1, 36_500)
        if horizon not in horizons:
            horizon = model.bundle.task.primary_horizon
        sort = q.get("sort") if q.get("sort") in SORTS else "risk"
        min_pct = _number(q.get("min_risk"), 0, 100)
        quiet = _int(q.get("max_days"), None, 0, 36_500)
        open_alert = q.get("open_alert") == "1"
        expired = q.get("expired") == "1"
        page = _int(q.get("page"), 1, 1, 200_000) or 1
        access = _access(request, "ui_population")
        data = service.population(
            horizon, sort=sort, min_risk=None if min_pct is None else min_pct / 100,
            open_alert=open_alert, max_quiet_days=quiet, expired=expired, limit=PAGE_SIZE,
            offset=(page - 1) * PAGE_SIZE, caller=caller, access=access)
        pages = max(1, -(-data["total"] // PAGE_SIZE))
        level = model.bundle.task.alert_thresholds().get(horizon)
        filters = {"horizon": horizon, "sort": sort, "min_risk": min_pct, "max_days": quiet,
                   "open_alert": open_alert, "expired": expired}

        def link(p: int) -> str:
            args = {k: v for k, v in {**filters, "page": p}.items()
                    if v not in (None, False)}
            args = {k: ("1" if v is True else v) for k, v in args.items()}
            return "/ui/population?" + "&".join(f"{k}={quote(str(v))}" for k, v in args.items())

        return render(request, "population.html", person=person, data=data,
                      horizons=horizons, filters=filters, page=page, pages=pages,
                      prev_link=link(page - 1) if page > 1 else None,
                      next_link=link(page + 1) if page < pages else None,
                      threshold=level.threshold if level else None, model=model,
                      monitoring=_monitoring(service, model))

    return _guard(request, work)


def _monitoring(service, model) -> list[dict[str, Any]]:
    """Monitoring alerts about the served version (``twincast monitor``'s)."""
    try:
        return [a for a in service.store.alerts.recent(model.name, 200)
                if str(a["model_version"]) == str(model.version)]
    except Exception as exc:  # the page still shows the twin; the log says why not this
        log.warning("monitoring alerts could not be read (%s)", type(exc).__name__)
        return []


# ------------------------------------------------------------------ a twin
@router.get("/ui/twins/{subject_id}")
def twin(request: Request, subject_id: str) -> Response:
    def work() -> Response:
        sid = _subject(subject_id)
        service, person, caller = signed_in(request, Action.READ_TWINS, "ui_twin", sid)
        access = _access(request, "ui_twin")
        view = json.loads(service.twin_view(sid, caller, access))  # logs the view first
        model = service.models.current_served()
        now = utcnow()
        with service.store.read() as s:
            rows, total = service.store.twins.forecasts(s, sid, HISTORY_LIMIT, 0)
            measures = s.execute(
                Event.__table__.select().with_only_columns(
                    Event.time, Event.code, Event.numeric_value)
                .where(Event.subject_id == sid, Event.superseded_at.is_(None),
                       Event.numeric_value.is_not(None), Event.time.is_not(None))
                .order_by(Event.time.desc()).limit(EVENT_LIMIT)).all()
            risks = service.store.risks.current(s, sid, now)
            alerts, _ = service.store.risks.alerts(s, now, kind="alert", state="all",
                                                   subject_id=sid, limit=20)
            reviews, _ = service.store.risks.alerts(s, now, kind=REVIEW, state="all",
                                                    subject_id=sid, limit=20)
        history = list(reversed(rows))
        fc = view["forecast"]
        ctx = _twin_context(model, sid, view, fc, history, total, measures, risks, now)
        return render(request, "twin.html", person=person, view=view, fc=fc, alerts=alerts,
                      reviews=reviews, may_ack=may(person.role, Action.WRITE_TWINS),
                      may_audit=may(person.role, Action.AUDIT), csrf=person.csrf,
                      monitoring=_monitoring(service, model), model=model, **ctx)

    return _guard(request, work)


def _subject(raw: str) -> int:
    from serving.store.ids import ASSIGNED_MAX

    if DIGITS.fullmatch(raw) and int(raw) <= ASSIGNED_MAX:  # ASCII digits only
        return int(raw)
    raise PageRefused(404, "There is no such twin.")


def _twin_context(model, sid: int, view: dict, fc: dict | None, history: list, total: int,
                  measures: list, risks: list[dict], now: datetime) -> dict[str, Any]:
    spec = model.bundle.spec
    levels = model.bundle.task.alert_thresholds()
    by_code: dict[str, list] = {}
    for t, code, value in reversed(measures):
        by_code.setdefault(code, []).append((t, float(value)))
    paths = (fc or {}).get("trajectories") or []
    bio = []
    for code in sorted(by_code, key=lambda c: (not c.startswith("LAB//EGFR"), c)):
        unit = spec.unit_of(code)
        pts = [charts.Point(t, v, f"{code} {describe_value(code, v, unit)} on {_day(t)}")
               for t, v in by_code[code]]
        bands = []
        as_of = _parse(fc.get("as_of")) if fc else None
        for p in paths:
            if p["code"] != code or as_of is None:
                continue
            widest = p["intervals"][0]
            at = as_of + timedelta(days=p["horizon_days"])
            bands.append(charts.Band(at, p["median"], widest["lower"], widest["upper"],
                                     f"forecast for {_day(at)}: median {p['median']:.1f}, "
                                     f"{widest['level']:.0%} interval {widest['lower']:.1f} "
                                     f"to {widest['upper']:.1f} {p.get('unit') or ''}".strip()))
        label = f"{code} ({unit})" if unit else code
        desc = (f"{len(pts)} measurements of {code} from {_day(pts[0].x)} to "
                f"{_day(pts[-1].x)}; latest {describe_value(code, pts[-1].y, unit)}"
                + (f"; forecast intervals at {len(bands)} future dates" if bands else ""))
        bio.append({"code": code, "unit": unit, "points": pts, "chart": charts.render(
            charts.Chart(f"{label} over time", desc, unit or code,
                         [charts.Series(code, pts, "measure")], bands=bands))})
    horizons = list(model.bundle.horizons)
    series, marks = [], []
    previous = None
    for f in history:
        if previous is not None and (f.model_version != previous.model_version
                                     or f.model_name != previous.model_name):
            marks.append((f.as_of or f.created_at, f"model v{f.model_version}"))
        previous = f
    for h in horizons:
        pts = [charts.Point(f.as_of, f.risks[f"{h}d"],
                            f"{f.risks[f'{h}d']:.1%} within {h} days, as of {_day(f.as_of)} "
                            f"(model v{f.model_version})")
               for f in history if f.status == "ok" and f.risks and f"{h}d" in f.risks
               and f.as_of is not None]
        series.append(charts.Series(f"{h} days", pts, f"risk h{h}"))
    lines = [(lv.threshold, f"{h}-day alert at {lv.threshold:.0%}")
             for h, lv in levels.items() if h in horizons]
    n_ok = sum(1 for f in history if f.status == "ok")
    risk_chart = charts.render(charts.Chart(
        "Forecast history: risk over time per horizon",
        f"{n_ok} forecasts from {_day(history[0].as_of) if history else '—'} to "
        f"{_day(history[-1].as_of) if history else '—'}, one point per forecast and horizon;"
        f" {len(marks)} model version changes marked by vertical lines",
        "risk", series, marks=marks, lines=lines, y_min=0.0,
        y_max=min(1.0, max([0.05] + [p.y for s in series for p in s.points]
                           + [v for v, _ in lines]) * 1.15), percent=True,
        chart_id="risk-history"))
    current = []
    for r in risks:
        lv = levels.get(r["horizon_days"])
        current.append({**r, "threshold": lv.threshold if lv else None,
                        "above": lv is not None and r["risk"] is not None
                        and r["risk"] >= lv.threshold})
    words = [_plain(c) for c in ((fc or {}).get("contributions") or [])]
    return {"sid": sid, "bio": bio, "risk_chart": risk_chart, "history": history,
            "history_total": total, "history_shown": len(history), "current": current,
            "words": words, "paths": paths, "horizons": horizons, "now": now}


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=None)


def _plain(c: dict[str, Any]) -> dict[str, Any]:
    """A contribution in plain words: what, its value, which way and how strongly."""
    v = float(c["contribution"])
    size = "slightly" if abs(v) < 0.1 else "moderately" if abs(v) < 0.5 else "strongly"
    way = "raises" if v > 0 else "lowers"
    return {"text": f"{c.get('label', c['feature'])} ({c.get('value_text', '')}) {size} "
                    f"{way} the risk",
            "direction": "up" if v > 0 else "down", "contribution": v,
            "horizon": int(c["horizon_days"])}


# ------------------------------------------------------------------ alerts
@router.get("/ui/alerts")
def alerts(request: Request) -> Response:
    def work() -> Response:
        service, person, caller = signed_in(request, Action.READ_TWINS, "ui_alerts")
        q = request.query_params
        kind = "review" if q.get("kind") == "review" else "alert"
        state = q.get("state") if q.get("state") in ("open", "acknowledged") else "open"
        page = _int(q.get("page"), 1, 1, 200_000) or 1
        data = service.alerts(kind=kind, state=state, limit=PAGE_SIZE,
                              offset=(page - 1) * PAGE_SIZE, caller=caller,
                              access=_access(request, "ui_alerts"))  # its twins logged
        rows, total = data["items"], data["total"]
        pages = max(1, -(-total // PAGE_SIZE))
        return render(request, "alerts.html", person=person, rows=rows, total=total,
                      kind=kind, state=state, page=page, pages=pages, csrf=person.csrf,
                      may_ack=may(person.role, Action.WRITE_TWINS),
                      notice=_int(q.get("done"), None, 1, 2**62))

    return _guard(request, work)


@router.post("/ui/alerts/{alert_id}/acknowledge")
async def acknowledge(request: Request, alert_id: str) -> Response:
    form = await _form(request)

    def work() -> Response:
        service, person, caller = signed_in(request, Action.WRITE_TWINS, "ui_acknowledge")
        _check_csrf(form, person)
        if not DIGITS.fullmatch(alert_id) or int(alert_id) > 2**62:
            raise PageRefused(404, "There is no such alert.")
        reason = str(form.get("reason", "")).replace("\x00", "").strip()
        if not reason:
            raise PageRefused(422, "Say why you acknowledge the alert (the reason is "
                              "recorded with your name).")
        info = _access(request, "ui_acknowledge_alert")
        service.acknowledge(int(alert_id), reason[:2000], caller, info)
        back = _safe_next(str(form.get("back", "")) or "/ui/alerts")
        sep = "&" if "?" in back else "?"
        return _headers(RedirectResponse(f"{back}{sep}done={int(alert_id)}", 303))

    import anyio

    return await anyio.to_thread.run_sync(_guard, request, work)


# ------------------------------------------------------------------ audit
@router.get("/ui/twins/{subject_id}/audit")
def audit(request: Request, subject_id: str) -> Response:
    def work() -> Response:
        sid = _subject(subject_id)
        service, person, caller = signed_in(request, Action.AUDIT, "ui_audit", sid)
        forecast_id = request.query_params.get("forecast", "")
        if not forecast_id:
            view = json.loads(service.twin_view(sid))
            forecast_id = (view.get("forecast") or {}).get("forecast_id", "")
        if not FORECAST_ID.fullmatch(forecast_id):
            raise PageRefused(404, "There is no such forecast.")
        result = service.audit(forecast_id, subject_id=sid)  # this twin's, checked first
        info = _access(request, "ui_audit")

        def log_it(s) -> None:
            service.store.access.add(s, [info.row(caller, sid)])
        service.store.db.transact(log_it)
        info.written = True
        return render(request, "audit.html", person=person, sid=sid, result=result,
                      chain_json=json.dumps(result.get("chain", {}), indent=2, default=str),
                      forecast_id=forecast_id)

    return _guard(request, work)


__all__ = ["iso", "router"]
