"""The MLflow Model Registry side: versions, aliases, the promotion gate and its log.

A model version's life is an explicit state machine (``challenger`` → ``champion`` →
``retired``); aliases carry it in the registry.  The registry keeps no history of alias
moves, so every move — by the gate or by hand — is also appended to a promotion log kept
in MLflow itself: one run per move in the experiment ``twincast-<task>-promotions``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from training.errors import RegistryError, RegistryUnreachable

BUNDLE_DIGEST_TAG = "twincast.bundle_sha256"  # SHA-256 of bundle.pkl, on runs and versions

CHAMPION, CHALLENGER = "champion", "challenger"


class VersionState(StrEnum):
    CHALLENGER = "challenger"
    CHAMPION = "champion"
    RETIRED = "retired"


ALLOWED = {
    (None, VersionState.CHALLENGER),
    (VersionState.CHALLENGER, VersionState.CHAMPION),
    (VersionState.CHAMPION, VersionState.RETIRED),
    (VersionState.RETIRED, VersionState.CHAMPION),  # a manual roll-back
    (VersionState.CHALLENGER, VersionState.RETIRED),
}


def model_name(task_name: str) -> str:
    return f"twincast-{task_name}"


def promotions_experiment(task_name: str) -> str:
    return f"twincast-{task_name}-promotions"


@dataclass(frozen=True)
class PromotionEntry:
    time: str
    from_version: str | None
    to_version: str
    actor: str
    kind: str  # "gate" or "manual"
    reason: str
    run_id: str | None


class Registry:
    """Registered models of one tracking server (an injected ``MlflowClient``)."""

    def __init__(self, client: MlflowClient, active=contextlib.nullcontext,
                 experiment_id=None):
        self.client = client
        self._active = active  # points MLflow's global URIs at this store while needed
        self._experiment_id = experiment_id  # creates experiments under the artifact root

    # -- lookups
    def version_by_alias(self, name: str, alias: str) -> ModelVersion | None:
        """The version the alias names; None when the model or alias does not exist,
        :class:`RegistryUnreachable` when the registry did not answer."""
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            _unless_missing(exc)
            return None

    def version(self, name: str, version: str | int) -> ModelVersion:
        try:
            return self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            _unless_missing(exc)
            raise RegistryError(f"model {name} has no version {version}") from None

    def ensure_model(self, name: str, description: str = "") -> None:
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description=description)

    # -- moves
    def register(self, name: str, model_uri: str, run_id: str,
                 tags: dict[str, str]) -> ModelVersion:
        """A new version (challenger) from a run's model; the run's recorded bundle
        digest is copied onto the version, where the service checks it before loading."""
        self.ensure_model(name)
        digest = self.client.get_run(run_id).data.tags.get(BUNDLE_DIGEST_TAG)
        if digest and BUNDLE_DIGEST_TAG not in tags:
            tags = {**tags, BUNDLE_DIGEST_TAG: digest}
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") \
            else None
        with self._active():
            mv = self.client.create_model_version(name, model_uri, run_id=run_id, tags=tags,
                                                  model_id=model_id)
        self._transition(name, str(mv.version), VersionState.CHALLENGER)
        self.client.set_registered_model_alias(name, CHALLENGER, str(mv.version))
        return mv

    def _transition(self, name: str, version: str, to: VersionState) -> None:
        mv = self.client.get_model_version(name, version)
        now = mv.tags.get("twincast.state")
        state = VersionState(now) if now else None
        if (state, to) not in ALLOWED:
            raise RegistryError(f"{name} version {version} cannot go from {state} to {to}")
        self.client.set_model_version_tag(name, version, "twincast.state", to.value)

    def promote(self, name: str, version: str, *, actor: str, kind: str, reason: str,
                task_name: str, run_id: str | None = None) -> PromotionEntry:
        """Point ``champion`` at ``version`` and append the move to the promotion log."""
        mv = self.version(name, version)
        old = self.version_by_alias(name, CHAMPION)
        old_version = str(old.version) if old else None
        if old_version == str(mv.version):
            raise RegistryError(f"{name} version {version} is already the champion")
        if old is not None:
            self._transition(name, old.version, VersionState.RETIRED)
        self._transition(name, mv.version, VersionState.CHAMPION)
        self.client.set_registered_model_alias(name, CHAMPION, mv.version)
        cur = self.version_by_alias(name, CHALLENGER)
        if cur is not None and str(cur.version) == str(mv.version):
            self.client.delete_registered_model_alias(name, CHALLENGER)
        entry = PromotionEntry(datetime.now(UTC).isoformat(), old_version, str(mv.version), actor,
                               kind, reason, run_id or mv.run_id)
        self._log(task_name, name, entry)
        return entry

    def _log(self, task_name: str, name: str, entry: PromotionEntry) -> None:
        exp_name = promotions_experiment(task_name)
        if self._experiment_id is not None:
            exp_id = self._experiment_id(exp_name)
        else:
            exp = self.client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(exp_name)
        run = self.client.create_run(exp_id, run_name=f"{entry.from_version}->{entry.to_version}",
                                     tags={"twincast.kind": "promotion", "model": name,
                                           "from_version": str(entry.from_version),
                                           "to_version": entry.to_version,
                                           "actor": entry.actor, "move": entry.kind,
                                           "reason": entry.reason[:4000],
                                           "model_run_id": str(entry.run_id),
                                           "time": entry.time})
        self.client.log_text(run.info.run_id, json.dumps(entry.__dict__, indent=2),
                             "promotion.json")
        self.client.set_terminated(run.info.run_id)

    def promotion_log(self, task_name: str) -> list[PromotionEntry]:
        """Every recorded move of ``champion``, oldest first."""
        exp = self.client.get_experiment_by_name(promotions_experiment(task_name))
        if exp is None:
            return []
        runs = self.client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"],
                                       max_results=10_000)
        out = []
        for r in runs:
            t = r.data.tags
            out.append(PromotionEntry(t["time"], None if t["from_version"] == "None"
                                      else t["from_version"], t["to_version"], t["actor"],
                                      t["move"], t["reason"], t.get("model_run_id")))
        return sorted(out, key=lambda e: e.time)


MISSING_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}


def _unless_missing(exc: MlflowException) -> None:
    """Re-raise an MLflow error that is not "no such thing" as unreachable."""
    if getattr(exc, "error_code", None) not in MISSING_CODES:
        raise RegistryUnreachable(f"the model registry did not answer "
                                  f"({getattr(exc, 'error_code', type(exc).__name__)})"
                                  ) from None


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
