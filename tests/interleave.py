"""Forced interleavings for race tests: run ``rival`` in another thread, to completion, just before
the n-th statement the current thread runs (counting only statements before its first write unless
``until_write`` is False). ``in_time`` says whether the rival ran inside; a test loops n upward
until it did not, so every point of the interleaving is tried."""

from __future__ import annotations

import threading

from sqlalchemy import event

WRITES = ("INSERT", "UPDATE", "DELETE")


class Interleave:
    def __init__(self, engine, n, rival, *, until_write=True, match=None):
        self.engine, self.n, self.rival, self.until_write, self.match = engine, n, rival, until_write, match
        self.writer = threading.get_ident()
        self.count, self.wrote, self.done, self.in_time, self.result = 0, False, False, False, None
        self.statements = []

    def _before(self, conn, cursor, statement, params, context, executemany):
        if threading.get_ident() != self.writer or self.done or self.wrote:
            return
        self.statements.append(statement.split("\n")[0][:80])
        is_write = statement.lstrip().upper().startswith(WRITES)
        if self.until_write and is_write and self.count < self.n:
            self.wrote = True
            return
        if self.until_write and is_write:
            self.wrote = True  # the rival still goes before the first write itself
        if (self.match is None and self.count == self.n) or (self.match is not None and self.match(statement)):
            t = threading.Thread(target=self._run)
            t.start()
            t.join(60)
            self.in_time = True
            self.done = True
        self.count += 1

    def _run(self):
        self.result = self.rival()

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._before)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._before)
