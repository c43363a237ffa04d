"""Background work shared fairly between tenants: a queue per tenant, served in turn by a few threads,
with at most one task of a tenant running at a time.

Dataset versions were processed by one thread for everyone, so one tenant's heavy upload (minutes of
parsing and tokenizing) held every other tenant's small one behind it. Here a tenant's task waits only
for that tenant's earlier tasks and for a free thread; tenants with work take the threads round-robin,
so with N threads, N tenants' work proceeds at once however much one of them queued.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger("adaptery")
Task = Callable[[], None]


class FairTasks:
    def __init__(self, workers: int, name: str) -> None:
        self._queues: dict[str, deque[Task]] = {}  # tenant -> its waiting tasks, in order
        self._turns: deque[str] = deque()  # tenants with a waiting task and none running, in turn order
        self._running: set[str] = set()
        self._changed = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, tenant_id: str, task: Task) -> bool:
        """Queue `task`; False (and nothing queued) once shutting down."""
        with self._changed:
            if self._stopping:
                return False
            self._queues.setdefault(tenant_id, deque()).append(task)
            if tenant_id not in self._running and tenant_id not in self._turns:
                self._turns.append(tenant_id)
            self._changed.notify()
        return True

    def _serve(self) -> None:
        while True:
            with self._changed:
                while not self._turns and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                tenant_id = self._turns.popleft()
                task = self._queues[tenant_id].popleft()
                self._running.add(tenant_id)
            try:
                task()
            except Exception:
                log.exception("a background task of tenant %s failed", tenant_id)
            with self._changed:
                self._running.discard(tenant_id)
                if self._queues.get(tenant_id):  # (gone when shut down meanwhile)
                    self._turns.append(tenant_id)  # behind the tenants already waiting: round-robin
                    self._changed.notify()
                else:
                    self._queues.pop(tenant_id, None)

    def shutdown(self) -> None:
        """Drop the waiting tasks; running ones finish on their own (their work is redone at the next start)."""
        with self._changed:
            self._stopping = True
            self._queues.clear()
            self._turns.clear()
            self._changed.notify_all()
