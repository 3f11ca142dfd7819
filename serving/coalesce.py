"""Concurrent requests applied as one transaction (group commit).

Requests arrive one twin at a time; the store's work is batch-first (one read, one
featurise-and-forecast call, one transaction — and one commit — for any number of
twins).  :class:`GroupCommit` applies them so: the first request to arrive while no batch
runs applies its own at once — alone at concurrency 1, so no request ever waits for a
timer — and the requests that arrive meanwhile wait and go together in the next batch
(at most ``max_batch``; with a ``key``, distinct keys only).  No request waits in the
queue longer than a write waits for the database (``WRITE_WAIT_SECONDS``): past that it
gets a 503.

Two users: :class:`Coalescer`, the one-twin writes of the events route (each part keeps
its own caller and access row; if a batch of several fails, each part is applied alone,
so one request's failure is never another's — unless the database is busy or down, or
no model is served, which answers every part at once), and the service's logged reads
of a twin's view (``TwinService.twin_view``: the views read and the access rows committed
in one transaction before any answer exists).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.exc import OperationalError

from serving.errors import NotReady, Unavailable
from serving.store.db import WRITE_WAIT_SECONDS
from serving.writes import TwinInput, TwinOutcome, TwinWriter
from training.errors import RegistryUnreachable

MAX_BATCH = 64
# errors of the database's or the model's state, the same for every part of a batch; any
# other error may be one part's own, so the parts are then tried one by one
SHARED_ERRORS = (Unavailable, NotReady, RegistryUnreachable, OperationalError)
I = TypeVar("I")  # noqa: E741 - an item, as typing's examples name it
O = TypeVar("O")  # noqa: E741


@dataclass
class _Slot(Generic[I, O]):
    item: I
    deadline: float = 0.0
    taken: bool = False  # in a running batch: it waits for that batch, whatever the time
    done: bool = False
    outcome: O | None = None
    error: BaseException | None = None


class GroupCommit(Generic[I, O]):
    """Items submitted by concurrent threads, applied in batches by ``apply(items)``,
    which answers each item's outcome or its own exception, in order (an exception it
    raises is every item's answer)."""

    def __init__(self, apply: Callable[[list[I]], list[O | BaseException]], *,
                 max_batch: int = MAX_BATCH, key: Callable[[I], Hashable] | None = None):
        self.apply = apply
        self.max_batch = max_batch
        self.key = key
        self._cond = threading.Condition()
        self._queue: list[_Slot[I, O]] = []
        self._busy = False
        self.batches = 0  # how many batches ran, and how many parts they held
        self.parts = 0

    def submit(self, item: I) -> O:
        """Apply ``item`` (in a batch); blocks until it is applied.  Raises its error."""
        slot: _Slot[I, O] = _Slot(item, deadline=time.monotonic() + WRITE_WAIT_SECONDS)
        with self._cond:
            self._queue.append(slot)
            while self._busy and not slot.done:
                left = slot.deadline - time.monotonic()
                if slot.taken:
                    self._cond.wait()
                elif left <= 0:  # queued behind slow batches for too long
                    self._queue.remove(slot)
                    raise Unavailable("the database is busy: try again shortly")
                else:
                    self._cond.wait(left)
            if not slot.done:
                batch = self._take(slot)
                self._busy = True
        if not slot.done:
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy = False
                    for s in batch:
                        s.done = True
                    self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
        assert slot.done
        return slot.outcome  # type: ignore[return-value]

    def _take(self, own: _Slot[I, O]) -> list[_Slot[I, O]]:
        """This thread's slot first, then queued ones (distinct keys), under the lock."""
        key = self.key
        batch, seen, rest = [own], {key(own.item) if key else None}, []
        for s in self._queue:
            if s is own:
                continue
            k = key(s.item) if key else None
            if len(batch) < self.max_batch and (key is None or k not in seen):
                batch.append(s)
                seen.add(k)
            else:
                rest.append(s)
        self._queue = rest
        for s in batch:
            s.taken = True
        return batch

    def _run(self, batch: list[_Slot[I, O]]) -> None:
        self.batches += 1
        self.parts += len(batch)
        try:
            answers = self.apply([s.item for s in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"{len(answers)} answers to a batch of {len(batch)}")
        except BaseException as exc:
            for s in batch:
                s.error = exc
            return
        for s, a in zip(batch, answers, strict=True):
            if isinstance(a, BaseException):
                s.error = a
            else:
                s.outcome = a


class Coalescer:
    """The events route's one-twin writes, batched (distinct twins per batch)."""

    def __init__(self, writer: TwinWriter, max_batch: int = MAX_BATCH):
        self.writer = writer
        self.group: GroupCommit[TwinInput, TwinOutcome] = GroupCommit(
            self._apply, max_batch=max_batch, key=lambda inp: inp.subject_id)

    @property
    def batches(self) -> int:
        return self.group.batches

    @property
    def parts(self) -> int:
        return self.group.parts

    def write(self, inp: TwinInput) -> TwinOutcome:
        """Apply one twin's write (``inp`` carries its caller and access); blocks until
        it is stored.  Raises what the write raised."""
        return self.group.submit(inp)

    def _apply(self, inputs: list[TwinInput]) -> list[TwinOutcome | BaseException]:
        try:
            return list(self.writer.write(inputs, inputs[0].caller, inputs[0].access))
        except Exception as exc:
            if len(inputs) == 1 or isinstance(exc, SHARED_ERRORS):
                raise  # the database's state, or a single part: the same answer
        out: list[TwinOutcome | BaseException] = []
        for inp in inputs:  # one part's failure must not be the others'
            try:
                out.append(self.writer.write([inp], inp.caller, inp.access)[0])
            except Exception as one:
                out.append(one)
        return out
