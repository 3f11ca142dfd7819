"""Concurrent one-twin writes applied as one batch (group commit).

Requests to the events route arrive one twin at a time; the write path is batch-first
(one read, one featurise-and-forecast call, one transaction for any number of twins).
The first request to arrive while no batch runs applies its own write at once — alone
at concurrency 1, so no request ever waits for a timer — and the requests that arrive
meanwhile wait and go together in the next batch.  A batch holds distinct twins, at
most ``max_batch``; each part keeps its own caller and access row.  If a batch of
several fails, each part is applied alone, so one request's failure is never another's
— unless the database is busy or down, or no model is served, which answers every part
at once.  No request waits in the queue longer than a write waits
for the database (``WRITE_WAIT_SECONDS``): past that it gets a 503.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from sqlalchemy.exc import OperationalError

from serving.errors import NotReady, Unavailable
from serving.store.db import WRITE_WAIT_SECONDS
from serving.writes import TwinInput, TwinOutcome, TwinWriter
from training.errors import RegistryUnreachable

MAX_BATCH = 64
# errors of the database's or the model's state, the same for every part of a batch; any
# other error may be one part's own, so the parts are then tried one by one
SHARED_ERRORS = (Unavailable, NotReady, RegistryUnreachable, OperationalError)


@dataclass
class _Slot:
    inp: TwinInput
    deadline: float = 0.0
    taken: bool = False  # in a running batch: it waits for that batch, whatever the time
    done: bool = False
    outcome: TwinOutcome | None = None
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class Coalescer:
    def __init__(self, writer: TwinWriter, max_batch: int = MAX_BATCH):
        self.writer = writer
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Slot] = []
        self._busy = False
        self.batches = 0  # how many batches ran, and how many parts they held
        self.parts = 0

    def write(self, inp: TwinInput) -> TwinOutcome:
        """Apply one twin's write (``inp`` carries its caller and access); blocks until
        it is stored.  Raises what the write raised."""
        slot = _Slot(inp, deadline=time.monotonic() + WRITE_WAIT_SECONDS)
        with self._cond:
            self._queue.append(slot)
            while self._busy and not slot.done:
                left = slot.deadline - time.monotonic()
                if slot.taken:
                    self._cond.wait()
                elif left <= 0:  # queued behind slow writes for too long
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
        assert slot.outcome is not None
        return slot.outcome

    def _take(self, own: _Slot) -> list[_Slot]:
        """This thread's slot first, then queued ones for other twins (under the lock)."""
        batch, twins, rest = [own], {own.inp.subject_id}, []
        for s in self._queue:
            if s is own:
                continue
            if len(batch) < self.max_batch and s.inp.subject_id not in twins:
                batch.append(s)
                twins.add(s.inp.subject_id)
            else:
                rest.append(s)
        self._queue = rest
        for s in batch:
            s.taken = True
        return batch

    def _run(self, batch: list[_Slot]) -> None:
        self.batches += 1
        self.parts += len(batch)
        try:
            outcomes = self.writer.write([s.inp for s in batch], batch[0].inp.caller,
                                         batch[0].inp.access)
        except BaseException as exc:
            if len(batch) == 1 or isinstance(exc, SHARED_ERRORS):
                for s in batch:  # the database's state, or a single part: the same answer
                    s.error = exc
                return
            for s in batch:  # one part's failure must not be the others'
                try:
                    s.outcome = self.writer.write([s.inp], s.inp.caller, s.inp.access)[0]
                except BaseException as one:
                    s.error = one
            return
        for s, o in zip(batch, outcomes, strict=True):
            s.outcome = o
