"""Where shard-parallel work runs: this process, or a Dask cluster.

``--scheduler`` (and ``TWINCAST_DASK_SCHEDULER``) names the cluster:

* ``local`` or ``local:N`` — a :class:`distributed.LocalCluster` of N worker processes
  (default: one per core), one thread each, started for the command and closed after it;
* ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` — an existing cluster's scheduler (``dask
  scheduler`` and ``dask worker``; TLS from Dask's own ``distributed.comm.tls``
  configuration).  Its workers must run the same twincast and see the same paths (the
  MEDS directory, the output, the MLflow store and the twin database) as the client.
  Patient rows travel between the machines, and whoever can reach the scheduler can run
  code on its workers: use TLS, or a network only the cluster's machines are on.

MEDS shards are the unit of work.  Dask re-runs a task whose worker died on another
worker, so every task here writes its output atomically (a temporary name, then a
rename) and returns only small summaries: re-running one is harmless.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from features.errors import FeaturesError

if TYPE_CHECKING:
    from distributed import Client, Future

T = TypeVar("T")

ENV = "TWINCAST_DASK_SCHEDULER"
_LOCAL = re.compile(r"local(?::(\d+))?")
_REMOTE = re.compile(r"(tcp|tls)://[^\s/:]+:\d{1,5}")


class SchedulerError(FeaturesError):
    """A scheduler address that is neither ``local[:N]`` nor ``tcp://HOST:PORT``, or a
    cluster that cannot be reached."""


@dataclass(frozen=True)
class Scheduler:
    """A parsed ``--scheduler`` value."""

    address: str | None  # tcp:// or tls://HOST:PORT, or None for a local cluster
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
        if _REMOTE.fullmatch(text):
            return cls(text)
        raise SchedulerError(f"{text!r} is not a scheduler: use local, local:N, "
                             "tcp://HOST:PORT or tls://HOST:PORT")

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
    (default ``TWINCAST_DASK_TIMEOUT``, else 30).  Local workers inherit this process's
    environment (the CLI's offline settings included).

    A local cluster's workers take one thread each: twincast's numeric kernels and
    LightGBM use their own threads, and a shard per process keeps memory per worker
    bounded by the shard."""
    if scheduler is None:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler.address is None:
        n = scheduler.workers or max(1, os.cpu_count() or 1)
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=None, host="127.0.0.1", memory_limit=0,
                          silence_logs=40, env={"OMP_NUM_THREADS": "1"}) as cluster, \
                Client(cluster) as client:
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
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise SchedulerError(f"the Dask scheduler at {scheduler.address} has no worker "
                                 f"(waited {timeout:g} s)") from None
        yield client


def worker_count(client: Client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


def _identity(value: T) -> T:
    return value


def keep(client: Client, value: T) -> Future:
    """``value`` held on the cluster as the result of a task (not scattered): if every
    worker holding it dies, the scheduler computes it again from the task."""
    return client.submit(_identity, value, pure=False)


def map_shards(client: Client, fn: Callable[..., T], items: Sequence[Any], *args: Any
               ) -> Iterator[tuple[int, T]]:
    """``fn(item, *args)`` for every item as a Dask task; yields (index, result) as they
    finish.  On an error, or when the caller stops early, the tasks not yet done are
    cancelled (none keeps running for a job that has failed)."""
    from distributed import as_completed

    futures = {client.submit(fn, item, *args, pure=False): i for i, item in enumerate(items)}
    try:
        for future in as_completed(futures):
            yield futures[future], future.result()
    except Exception as exc:
        raise cluster_error(exc) from exc
    finally:
        client.cancel(list(futures))


def cluster_error(exc: BaseException) -> BaseException:
    """Dask's own failures (a task whose workers kept dying, a cancelled future) as a
    :class:`SchedulerError`; twincast's errors from inside a task pass unchanged."""
    if type(exc).__module__.startswith("distributed"):
        return SchedulerError(f"the Dask cluster failed: {type(exc).__name__}: {exc}")
    return exc


def check_visible(client: Client, *folders: Path) -> None:
    """Refuse to start when a worker cannot see a folder the job reads or writes: the
    MEDS directory, the output's folder (a remote cluster needs them on shared storage)."""
    want = [str(Path(f).resolve()) for f in folders]
    seen = client.run(lambda: [os.path.isdir(f) for f in want])
    for worker, flags in seen.items():
        for folder, ok in zip(want, flags, strict=True):
            if not ok:
                raise SchedulerError(f"the Dask worker {worker} cannot see {folder}: a "
                                     "cluster's workers need the data and output folders "
                                     "on storage they share with this machine")
