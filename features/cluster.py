"""Where shard-parallel work runs: this process, or a Dask cluster.

``--scheduler`` (and ``TWINCAST_DASK_SCHEDULER``) names the cluster:

* ``local`` or ``local:N`` — a :class:`distributed.LocalCluster` of N worker processes
  (default: one per core), one thread each, started for the command and closed after it;
* ``tcp://HOST:PORT`` — an existing cluster's scheduler (``dask scheduler`` and
  ``dask worker``).  Its workers must run the same twincast and see the same paths (the
  MEDS directory, the output, the MLflow store and the twin database) as the client.

MEDS shards are the unit of work.  Dask re-runs a task whose worker died on another
worker, so every task here writes its output atomically (a temporary name, then a
rename) and returns only small summaries: re-running one is harmless.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from features.errors import FeaturesError

if TYPE_CHECKING:
    from distributed import Client

ENV = "TWINCAST_DASK_SCHEDULER"
_LOCAL = re.compile(r"local(?::(\d+))?")
_TCP = re.compile(r"tcp://[^\s/:]+:\d{1,5}")


class SchedulerError(FeaturesError):
    """A scheduler address that is neither ``local[:N]`` nor ``tcp://HOST:PORT``, or a
    cluster that cannot be reached."""


@dataclass(frozen=True)
class Scheduler:
    """A parsed ``--scheduler`` value."""

    address: str | None  # tcp://HOST:PORT, or None for a local cluster
    workers: int | None = None  # local clusters only

    @classmethod
    def parse(cls, text: str) -> Scheduler:
        text = text.strip()
        local = _LOCAL.fullmatch(text)
        if local:
            n = int(local.group(1)) if local.group(1) else None
            if n is not None and not 1 <= n <= 256:
                raise SchedulerError(f"local:{n}: the number of workers must be 1 to 256")
            return cls(None, n)
        if _TCP.fullmatch(text):
            return cls(text)
        raise SchedulerError(f"{text!r} is not a scheduler: use local, local:N or "
                             "tcp://HOST:PORT")

    def describe(self) -> str:
        if self.address:
            return self.address
        return f"local:{self.workers}" if self.workers else "local"


def from_environment(option: str | None) -> Scheduler | None:
    """The scheduler from ``--scheduler``, else ``TWINCAST_DASK_SCHEDULER``, else None
    (this process does the work)."""
    text = option if option is not None else os.environ.get(ENV) or None
    return None if text is None else Scheduler.parse(text)


@contextlib.contextmanager
def connect(scheduler: Scheduler | None, *, timeout: float | None = None
            ) -> Iterator[Client | None]:
    """A Dask client for ``scheduler`` for the duration of the block (None: no cluster).
    A remote scheduler must answer, and have a worker, within ``timeout`` seconds
    (default ``TWINCAST_DASK_TIMEOUT``, else 30).

    A local cluster's workers take one thread each: twincast's numeric kernels and
    LightGBM use their own threads, and a shard per process keeps memory per worker
    bounded by the shard."""
    if scheduler is None:
        yield None
        return
    from distributed import Client, LocalCluster

    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true",
           "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    if scheduler.address is None:
        n = scheduler.workers or max(1, os.cpu_count() or 1)
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=None, host="127.0.0.1", memory_limit=0,
                          silence_logs=40) as cluster, Client(cluster) as client:
            yield client
        return
    if timeout is None:
        timeout = float(os.environ.get("TWINCAST_DASK_TIMEOUT") or 30)
    try:
        client = Client(scheduler.address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise SchedulerError(f"cannot reach the Dask scheduler at {scheduler.address}: "
                             f"{exc}") from None
    with client:
        client.wait_for_workers(1, timeout=timeout)
        yield client


def worker_count(client: Client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])
