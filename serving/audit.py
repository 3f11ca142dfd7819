"""The audit chain of a served forecast, every link verified.

forecast (subject, as-of time, risks, who asked, when) → model name and version (still
champion?) → MLflow run (metrics with intervals, params, tags) → training-data digest and
dataset input → task and FeatureSpec digests → code version; and the forecast reproduced
bit for bit by reloading that model version on the twin's history as it was then (events
received by the forecast's watermark).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from features.digest import dataset_digest
from features.events import open_meds
from serving.errors import ArtifactRefused, NotFound
from serving.forecasting import forecast_batch
from serving.model_source import ModelSource
from serving.store import Store
from serving.store.twins import forecast_digest
from serving.tamper import forecast_dict
from serving.views import iso
from training.errors import RegistryError, RegistryUnreachable
from training.registry import CHAMPION


@dataclass
class Link:
    name: str
    ok: bool
    detail: str


def audit_forecast(store: Store, source: ModelSource, forecast_id: str, *,
                   check_data: bool = True) -> dict[str, Any]:
    """The chain of one forecast with each link checked; ``ok`` only if all hold."""
    with store.read() as s:
        row = store.twins.forecast_by_id(s, forecast_id)
        if row is None:
            raise NotFound(f"no forecast {forecast_id}")
        fc = forecast_dict(row)
        stored_digest = row.row_digest
    links: list[Link] = []
    chain: dict[str, Any] = {"forecast": {
        "forecast_id": fc["forecast_id"], "subject_id": fc["subject_id"],
        "as_of": iso(fc["as_of"]), "status": fc["status"], "reason": fc["reason"],
        "risks": fc["risks"], "trajectories": fc.get("trajectories"),
        "requested_by": fc["requested_by"],
        "created_at": iso(fc["created_at"]), "watermark": iso(fc["watermark"])}}
    intact = forecast_digest(fc) == stored_digest
    links.append(Link("forecast row intact", intact,
                      "content matches its digest" if intact
                      else "the stored row does not match its digest: altered after writing"))
    reg, client = source.tracker.registry, source.tracker.client
    mv = None
    try:
        mv = reg.version(fc["model_name"], fc["model_version"])
    except RegistryError:
        pass
    except (RegistryUnreachable, MlflowException, OSError) as exc:
        links.append(Link("registry reachable", False,
                          f"the model registry is unreachable ({type(exc).__name__}): the "
                          "model version, run and data links cannot be checked now"))
        return _result(chain, links)
    if mv is None:
        links.append(Link("model version exists", False,
                          f"{fc['model_name']} version {fc['model_version']} is not in the "
                          "registry (deleted?)"))
        return _result(chain, links)
    champ = reg.version_by_alias(fc["model_name"], CHAMPION)
    chain["model"] = {"name": fc["model_name"], "version": str(mv.version),
                      "is_champion": champ is not None and str(champ.version) == str(mv.version),
                      "current_champion": None if champ is None else str(champ.version),
                      "tags": dict(mv.tags)}
    links.append(Link("model version exists", True,
                      f"{fc['model_name']} version {mv.version}"))
    try:
        run = client.get_run(mv.run_id)
    except MlflowException:
        run = None
    run_ok = run is not None and mv.run_id == fc["run_id"]
    links.append(Link("run exists and matches", run_ok,
                      f"run {mv.run_id}" if run_ok else
                      f"run {fc['run_id']} is missing or differs from the version's run"))
    if run is None:
        return _result(chain, links)
    metrics = run.data.metrics
    chain["run"] = {"run_id": run.info.run_id, "params": dict(run.data.params),
                    "tags": {k: v for k, v in run.data.tags.items()
                             if not k.startswith("mlflow.")},
                    "metrics": {k: {"estimate": v, "lower": metrics.get(k + "_lo"),
                                    "upper": metrics.get(k + "_hi")}
                                for k, v in sorted(metrics.items())
                                if not k.endswith(("_lo", "_hi"))}}
    tags = run.data.tags
    for label, key, on_forecast in (("FeatureSpec digest", "feature_spec_digest",
                                     fc["feature_spec_digest"]),
                                    ("task digest", "task_digest", fc["task_digest"]),
                                    ("code version", "code_version", fc["code_version"])):
        values = {on_forecast, mv.tags.get(key), tags.get(key)}
        links.append(Link(f"{label} agrees", len(values) == 1,
                          f"{on_forecast[:16]}… on forecast, version and run" if len(values) == 1
                          else f"forecast {on_forecast!r}, version {mv.tags.get(key)!r}, "
                               f"run {tags.get(key)!r}"))
    data_digest = tags.get("data_digest")
    inputs = run.inputs.dataset_inputs if run.inputs else []
    recorded = [{t.key: t.value for t in i.tags}.get("twincast.sha256") for i in inputs]
    chain["data"] = {"digest": data_digest,
                     "dataset_inputs": [{"name": i.dataset.name, "source": i.dataset.source,
                                         "digest": i.dataset.digest} for i in inputs]}
    same = data_digest is not None and data_digest == mv.tags.get("data_digest") and \
        data_digest in recorded
    links.append(Link("training-data digest agrees", same,
                      "run tag, version tag and dataset input agree" if same else
                      "the data digest differs between run, version and dataset input"))
    if check_data and inputs:
        import json

        src = json.loads(inputs[0].dataset.source).get("uri")
        if src and Path(src).exists():
            now = dataset_digest(open_meds(src))
            links.append(Link("training data unchanged", now == data_digest,
                              f"{src} still hashes to {now[:16]}…" if now == data_digest else
                              f"{src} now hashes to {now[:16]}…, not the recorded "
                              f"{str(data_digest)[:16]}…: the training data changed"))
        else:
            links.append(Link("training data unchanged", True,
                              f"source {src} not reachable from here: not re-hashed"))
    chain["task_digest"], chain["feature_spec_digest"] = fc["task_digest"], \
        fc["feature_spec_digest"]
    chain["code_version"] = fc["code_version"]
    links.append(_reproduce(store, source, fc))
    return _result(chain, links)


def _reproduce(store: Store, source: ModelSource, fc: dict[str, Any]) -> Link:
    try:
        model = source.load(fc["model_version"])
    except ArtifactRefused as exc:
        return Link("model artifact verified", False, str(exc))
    except Exception as exc:
        return Link("forecast reproduced", False, f"cannot load the model: {type(exc).__name__}")
    with store.read() as s:
        history = store.twins.histories(s, [fc["subject_id"]], recorded_upto=fc["watermark"])
    again = forecast_batch(model, history.arrays, [fc["subject_id"]], [fc["as_of"]])[0]
    # rows from before trajectories (digest versions 1 and 2) stored none
    paths_same = (fc.get("digest_version") or 1) < 3 or again.trajectories == fc["trajectories"]
    same = (again.status == fc["status"] and again.risks == fc["risks"]
            and again.feature_digest == fc["feature_digest"] and paths_same)
    return Link("forecast reproduced", same,
                "bit for bit from the twin's history as of then" if same else
                "reloading the model on the recorded history gives a different forecast")


def _result(chain: dict, links: list[Link]) -> dict[str, Any]:
    return {"ok": all(link.ok for link in links), "links": [asdict(x) for x in links],
            "chain": chain}
