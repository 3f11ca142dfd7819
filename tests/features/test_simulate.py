"""The synthetic CKD cohort: deterministic, plausible, and shaped as documented."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from features.events import EventArrays, read_events, write_meds
from features.labels import derive_labels
from features.simulate import (
    CODES,
    ShardPlan,
    Shift,
    simulate_cohort,
    write_plan_shard,
    write_sharded_cohort,
)


def digest_dir(path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*.parquet")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    a = write_meds(simulate_cohort(300, seed=3), tmp_path / "a", codes=CODES)
    b = write_meds(simulate_cohort(300, seed=3), tmp_path / "b", codes=CODES)
    c = write_meds(simulate_cohort(300, seed=4), tmp_path / "c", codes=CODES)
    assert digest_dir(a) == digest_dir(b) != digest_dir(c)


def test_cohort_is_plausible(small_cohort, eskd_task):
    ev = small_cohort
    egfr = ev.loc[ev["code"] == "LAB//EGFR", "numeric_value"]
    assert 25 < egfr.median() < 60
    per_subject = ev.groupby("subject_id")["code"]
    assert (per_subject.apply(lambda c: (c == "MEDS_BIRTH").sum()) == 1).all()
    outcome = set(ev.loc[ev["code"] == "DX//ESKD", "subject_id"])
    death = set(ev.loc[ev["code"] == "MEDS_DEATH", "subject_id"])
    assert outcome and death and not outcome & death  # follow-up stops at the first
    labels = derive_labels(EventArrays.from_events(ev), eskd_task)
    assert (labels["censored_730d"]).any() and (labels["label_730d"] == 1).any()


def test_sicker_patients_are_seen_more_often(small_cohort):
    ev = small_cohort
    visits = ev[~ev["time"].isna()].groupby("subject_id")["time"].nunique()
    span = ev.groupby("subject_id")["time"].agg(lambda t: (t.max() - t.min()).days / 365.25)
    low = ev[ev["code"] == "LAB//EGFR"].groupby("subject_id")["numeric_value"].min() < 30
    rate = (visits / span.clip(lower=0.5)).reindex(low.index)
    assert rate[low].median() > 1.3 * rate[~low].median()


def test_sglt2_inhibitor_slows_decline_among_diabetics():
    ev = simulate_cohort(3000, seed=11)
    egfr = ev[ev["code"] == "LAB//EGFR"]
    first_last = egfr.groupby("subject_id").agg(
        t0=("time", "min"), t1=("time", "max"), v0=("numeric_value", "first"),
        v1=("numeric_value", "last"))
    years = (first_last["t1"] - first_last["t0"]).dt.days / 365.25
    slope = ((first_last["v1"] - first_last["v0"]) / years)[years > 2]
    diabetic = slope.index.isin(ev.loc[ev["code"] == "DX//DIABETES", "subject_id"].unique())
    treated = slope.index.isin(ev.loc[ev["code"] == "RX//SGLT2", "subject_id"].unique())
    assert (diabetic & treated).sum() > 100 and (diabetic & ~treated).sum() > 100
    assert np.median(slope[diabetic & treated]) > np.median(slope[diabetic & ~treated]) + 0.3


# ----------------------------------------------------------------------------- shards


def content_digest(events) -> str:
    """The events' values (not their parquet bytes, which carry the writer's version)."""
    h = hashlib.sha256()
    h.update(events["subject_id"].to_numpy().tobytes())
    h.update(events["time"].to_numpy().view(np.int64).tobytes())
    h.update("\n".join(events["code"].astype(str)).encode())
    h.update(events["numeric_value"].to_numpy().tobytes())
    return h.hexdigest()


def shard_subjects(path) -> list[np.ndarray]:
    files = sorted((path / "data").glob("*.parquet"), key=lambda p: int(p.stem))
    return [np.unique(pq.read_table(f, columns=["subject_id"]).column(0).to_numpy())
            for f in files]


def test_unsharded_cohort_is_unchanged():
    """The events simulate_cohort drew before shards existed (pinned: a change here is a
    new cohort for every user of ``twincast simulate``, and needs saying so)."""
    assert content_digest(simulate_cohort(120, seed=3)) == (
        "e9b9ca7982263e51e7328a0a6b78f7741305dfb8fcb5d069db5936aef95e8ece")


def test_sharded_same_seed_same_bytes(tmp_path):
    seen: list[int] = []
    a = write_sharded_cohort(tmp_path / "a", ShardPlan(300, 3, seed=3), progress=seen.append)
    b = write_sharded_cohort(tmp_path / "b", ShardPlan(300, 3, seed=3))
    write_sharded_cohort(tmp_path / "c", ShardPlan(300, 3, seed=4))
    assert a == b == sum(seen) and len(seen) == 3
    assert digest_dir(tmp_path / "a") == digest_dir(tmp_path / "b") != digest_dir(tmp_path / "c")
    meta = json.loads((tmp_path / "a" / "metadata" / "dataset.json").read_text())
    assert meta["dataset_version"] == "subjects=300,seed=3,shards=3"
    assert pd.read_parquet(tmp_path / "a" / "metadata" / "codes.parquet").equals(CODES)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["data", "metadata"]


def test_each_shard_holds_exactly_its_id_range(tmp_path):
    plan = ShardPlan(301, 4, seed=1, first_subject_id=1000)
    total = write_sharded_cohort(tmp_path / "m", plan)
    ids = shard_subjects(tmp_path / "m")
    assert [s.size for s in ids] == [76, 75, 75, 75]  # as equal as possible
    for k, s in enumerate(ids):
        assert s.tolist() == list(plan.ids(k))  # every id of the range, and no other
    union = np.concatenate(ids)
    assert union.size == np.unique(union).size == 301  # no subject spans two shards
    assert union.min() == 1000 and union.max() == 1300
    events = read_events(tmp_path / "m")  # validates every file
    assert len(events) == total
    assert (events.loc[events["code"] == "MEDS_BIRTH", "subject_id"].value_counts() == 1).all()


def test_a_shard_depends_only_on_the_seed_its_index_and_its_ids():
    plan = ShardPlan(400, 4, seed=9, steady=True)
    alone = simulate_cohort(100, seed=np.random.SeedSequence(9).spawn(4)[2],
                            first_subject_id=201, steady=True)
    assert content_digest(plan.simulate(2)) == content_digest(alone)
    nine = ShardPlan(9, 3)
    shards = [(k, nine.simulate(k)["subject_id"].unique().tolist()) for k in range(3)]
    assert shards == [(0, [1, 2, 3]), (1, [4, 5, 6]), (2, [7, 8, 9])]


def test_another_shard_count_is_another_valid_cohort(tmp_path):
    digests = set()
    for k in (1, 2, 3):
        out = write_sharded_cohort(tmp_path / str(k), ShardPlan(240, k, seed=5))
        events = read_events(tmp_path / str(k))
        assert len(events) == out and events["subject_id"].nunique() == 240
        assert set(events["code"].astype(str)) <= set(CODES["code"])
        digests.add(content_digest(events))
    digests.add(content_digest(simulate_cohort(240, seed=5)))  # nor is any the unsharded one
    assert len(digests) == 4


def test_shard_plan_refuses_what_it_cannot_make():
    with pytest.raises(ValueError, match="4 shards need at least as many subjects, got 3"):
        ShardPlan(3, 4)
    with pytest.raises(ValueError, match="non-negative"):
        ShardPlan(10, 2, seed=-1)
    with pytest.raises(IndexError):
        ShardPlan(10, 2).ids(2)


def test_a_rerun_shard_task_is_harmless(tmp_path):
    """What Dask does after a lost worker: the shard is written again, whole, in place."""
    plan = ShardPlan(90, 3, seed=2)
    (tmp_path / "data").mkdir()
    first = write_plan_shard(tmp_path, plan, 1)
    before = (tmp_path / "data" / "1.parquet").read_bytes()
    assert write_plan_shard(tmp_path, plan, 1) == first
    assert (tmp_path / "data" / "1.parquet").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary left


def test_dask_workers_write_the_same_bytes(tmp_path):
    from features.cluster import Scheduler, connect

    plan = ShardPlan(200, 5, seed=8, shift=Shift.parse("egfr_assay:1.15@2021-01-01"))
    here = write_sharded_cohort(tmp_path / "here", plan)
    with connect(Scheduler.parse("local:2")) as client:
        there = write_sharded_cohort(tmp_path / "there", plan, client=client)
    assert here == there
    assert digest_dir(tmp_path / "here") == digest_dir(tmp_path / "there")
    assert (tmp_path / "here" / "metadata" / "dataset.json").read_text() == (
        tmp_path / "there" / "metadata" / "dataset.json").read_text()
    assert sorted(p.name for p in (tmp_path / "there").iterdir()) == ["data", "metadata"]


BIN = Path(sys.executable).parent / "twincast"


def twincast(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TWINCAST_DASK_SCHEDULER": ""})


def test_cli_writes_the_sharded_cohort(tmp_path):
    proc = twincast("simulate", "--subjects", "200", "--shards", "3", "--seed", "5",
                    "--out", str(tmp_path / "cli"))
    assert proc.returncode == 0, proc.stderr
    assert "events of 200 subjects in 3 shards" in proc.stderr
    assert [s.size for s in shard_subjects(tmp_path / "cli")] == [67, 67, 66]
    write_sharded_cohort(tmp_path / "api", ShardPlan(200, 3, seed=5))
    assert digest_dir(tmp_path / "cli") == digest_dir(tmp_path / "api")
    meta = json.loads((tmp_path / "cli" / "metadata" / "dataset.json").read_text())
    assert meta["dataset_version"] == "subjects=200,seed=5,shards=3"

    bad = twincast("simulate", "--subjects", "3", "--shards", "4", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "4 shards need at least as many subjects" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_cli_without_shards_is_the_unsharded_cohort(tmp_path):
    proc = twincast("simulate", "--subjects", "150", "--seed", "5", "--shard-subjects", "60",
                    "--out", str(tmp_path / "cli"))
    assert proc.returncode == 0, proc.stderr
    write_meds(simulate_cohort(150, seed=5), tmp_path / "api", codes=CODES, shard_subjects=60)
    assert digest_dir(tmp_path / "cli") == digest_dir(tmp_path / "api")
    meta = json.loads((tmp_path / "cli" / "metadata" / "dataset.json").read_text())
    assert meta["dataset_version"] == "subjects=150,seed=5"
