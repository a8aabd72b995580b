"""Group commit: items from concurrent threads made durable together, one sync for all."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Waiting(Generic[T, R]):
    """One submitted item: its result or error, and whether its thread is to lead next."""

    def __init__(self, item: T) -> None:
        self.item = item
        self.result: R | None = None
        self.error: BaseException | None = None
        self.lead = False
        self.ready = threading.Event()


class GroupCommit(Generic[T, R]):
    """Items from concurrent threads committed together each time the store is free, instead
    of one commit - one fsync - per item.

    ``commit(items)`` makes all of them durable at once and returns one result per item, in
    order. Every caller still returns only after the commit holding its item. The first caller
    leads (no hand-off to another thread: one association pays nothing); items arriving while
    it commits are taken together by the next leader, one of their own threads. A failing
    batch is re-run item by item, so one item's error never fails the others.
    """

    def __init__(self, commit: Callable[[list[T]], list[R]]) -> None:
        self.commit = commit
        self._lock = threading.Lock()
        self._pending: list[_Waiting[T, R]] = []
        self._leading = False
        self.batches = 0  #: commits that succeeded (with ``items``: the mean batch size)
        self.items = 0

    def submit(self, item: T) -> R:
        """Commit ``item`` and return its result once durable (raises what committing raised)."""
        mine: _Waiting[T, R] = _Waiting(item)
        with self._lock:
            self._pending.append(mine)
            lead = not self._leading
            self._leading = True
        if not lead:
            mine.ready.wait()
        if mine.lead or lead:
            self._run_batch()
        if mine.error is not None:
            raise mine.error
        return mine.result  # type: ignore[return-value]

    def _run_batch(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        try:
            self._commit(batch)
        finally:
            with self._lock:
                if self._pending:  # the next leader is one of the threads that waited
                    self._pending[0].lead = True
                    self._pending[0].ready.set()
                else:
                    self._leading = False
            for waiting in batch:
                waiting.ready.set()

    def _commit(self, batch: list[_Waiting[T, R]]) -> None:
        try:
            results = self.commit([w.item for w in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            for waiting in batch:  # find the one that failed; the others commit alone
                self._commit([waiting])
            return
        self.batches += 1
        self.items += len(batch)
        for waiting, result in zip(batch, results, strict=True):
            waiting.result = result
