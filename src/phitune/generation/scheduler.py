"""The server's generation thread: continuous batching of requests over one engine.

Requests wait in a bounded queue; between two decode steps the waiting ones join the running batch
(up to max_batch rows), and finished or cancelled rows leave it, so a client that disconnects frees
its row within one step. Every model call happens on this one thread.

Admission is first come, first served: a request whose adapter cannot share the running batch (see
Engine.joinable) stops later ones from joining, so it waits at most for the batch in flight to end.
A request that fails (its prefill, its sampling, its client) ends alone; only a failed decode step of
the whole batch ends every row in it.
"""
from __future__ import annotations

import collections
import threading

from phitune.generation.engine import Engine, Request, end_with_error


class Busy(Exception):
    """The queue is full: the request was not accepted."""


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64):
        self.engine = engine
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="phitune-generate", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request; raises Busy at once when max_queue requests are already waiting."""
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise Busy(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(request)
            self._wake.notify()

    @property
    def active(self) -> int:
        return len(self.engine.rows)

    def close(self) -> None:
        """Stop the thread: rows in flight and requests still waiting end with an error at once."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _loop(self):
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self.engine.rows:
                    self._wake.wait()
                if self._closed:  # rows in flight and requests still waiting end now, not never
                    self.engine.fail("the server is shutting down", also=list(self._waiting))
                    self._waiting.clear()
                    return
                room = self.max_batch - len(self.engine.rows)
                joining = self.engine.joinable(list(self._waiting), room, fair=True) if room > 0 else []
                for r in joining:
                    self._waiting.remove(r)
            if joining:
                self._admit(joining)
            try:
                self.engine.step()
            except Exception as e:  # a failed step ends the rows in flight with the error; the server goes on
                self.engine.fail(f"{type(e).__name__}: {e}")

    def _admit(self, joining: list) -> None:
        """Prefill the joining requests together; if that fails, each alone, so only the culprit ends."""
        try:
            self.engine.add(joining)
            return
        except Exception as e:
            if len(joining) == 1:
                end_with_error(joining[0], e)
                return
        for r in joining:
            try:
                self.engine.add([r])
            except Exception as e:
                end_with_error(r, e)
