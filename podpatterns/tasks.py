"""Background tasks with an owner that notices when one dies.

A component's long-running loops (a health-check loop, a directory watcher, a heartbeat)
are started with :meth:`TaskSet.spawn`, never with a bare ``asyncio.create_task``. When a
loop ends with an exception, or returns although it was meant to run until cancelled, the
set logs a ``task_died`` error event (with the traceback: it is a bug or an unexpected
state, never something to swallow), remembers it in :attr:`TaskSet.died`, and calls the
owner's ``on_death`` callback. Components report ``is_live() == not tasks.died``, so a
frozen loop turns ``/livez`` 503 and the kubelet restarts the container instead of leaving
readiness or ``--exit-with`` silently stuck (trio's "exceptions must always propagate").

Cancelling the set (:meth:`TaskSet.aclose`) is not a death.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from podpatterns import logs


class TaskSet:
    """Owns named background tasks; a task that dies is logged and remembered.

    Args:
        component: the ``component`` of the log events.
        on_death: called with the task's name and its exception (``None`` when it
            returned) after the death is logged.
    """

    def __init__(
        self,
        component: str,
        *,
        on_death: Callable[[str, BaseException | None], None] | None = None,
    ) -> None:
        self.died: dict[str, str] = {}
        """Name of each task that died -> what it died of."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._may_return: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._on_death = on_death
        self._log = logs.get(component)

    def spawn(
        self, coro: Coroutine[Any, Any, Any], name: str, *, may_return: bool = False
    ) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of this set.

        Args:
            coro: the loop.
            name: its name in log events and :attr:`died`.
            may_return: returning is a normal end (a one-shot task such as a shutdown
                trigger); by default a task is meant to run until cancelled, and
                returning is a death.
        """
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        if may_return:
            self._may_return.add(task)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def healthy(self) -> bool:
        """No task has died."""
        return not self.died

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        may_return = task in self._may_return
        self._may_return.discard(task)
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        if exc is None and may_return:
            return
        name = task.get_name()
        self.died[name] = "returned" if exc is None else f"{type(exc).__name__}: {exc}"
        if exc is None:
            self._log.error("task_died", task=name, error="returned unexpectedly")
        else:
            self._log.error(
                "task_died", task=name, error=str(exc) or type(exc).__name__, exc_info=exc
            )
        if self._on_death is not None:
            self._on_death(name, exc)

    def cancel(self) -> None:
        """Cancel every task (what ends now is not a death)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        """Cancel every task and wait until all have ended."""
        self.cancel()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks)
