"""Concurrent one-twin writes applied as one batch (group commit).

Requests to the events route arrive one twin at a time; the write path is batch-first
(one read, one featurise-and-forecast call, one transaction for any number of twins).
The first request to arrive while no batch runs applies its own write at once — alone
at concurrency 1, so no request ever waits for a timer — and the requests that arrive
meanwhile wait and go together in the next batch.  A batch holds distinct twins, at
most ``max_batch``; each part keeps its own caller and access row.  If a batch of
several fails for one part's reason (its input, its identifiers), each part is applied
alone, so one request's failure is never another's; a database that is busy or down
answers every part at once.  No request waits in the queue longer than a write waits
for the database (``WRITE_WAIT_SECONDS``): past that it gets a 503.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from serving.errors import BadInput, Conflict, Unavailable
from serving.store.db import WRITE_WAIT_SECONDS
from serving.writes import TwinInput, TwinOutcome, TwinWriter

MAX_BATCH = 64
PART_ERRORS = (BadInput, Conflict)  # errors one part of a batch can cause on its own


@dataclass
class _Slot:
    inp: TwinInput
    deadline: float = 0.0
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
                if left <= 0:  # queued behind slow writes for too long
                    self._queue.remove(slot)
                    raise Unavailable("the database is busy: try again shortly")
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
        return batch

    def _run(self, batch: list[_Slot]) -> None:
        self.batches += 1
        self.parts += len(batch)
        try:
            outcomes = self.writer.write([s.inp for s in batch], batch[0].inp.caller,
                                         batch[0].inp.access)
        except BaseException as exc:
            if len(batch) == 1 or not isinstance(exc, PART_ERRORS):
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
