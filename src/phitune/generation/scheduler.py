"""The server's generation thread: continuous batching of requests over one engine.

Requests wait in a bounded queue; between two decode steps the waiting ones join the running batch
(up to max_batch rows), and finished or cancelled rows leave it, so a client that disconnects frees
its row within one step. Every model call happens on this one thread.
"""
from __future__ import annotations

import collections
import threading

from phitune.generation.engine import Engine, Request


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
                joining = self.engine.joinable(list(self._waiting), room) if room > 0 else []
                for r in joining:
                    self._waiting.remove(r)
            try:
                if joining:
                    self.engine.add(joining)
                self.engine.step()
            except Exception as e:  # a failed step ends the rows in flight with the error; the server goes on
                self.engine.fail(f"{type(e).__name__}: {e}", also=joining)
