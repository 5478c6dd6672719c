"""Waiting, inside an asyncio test, for a condition while the tasks under test run: the wait
ends when the condition holds, fails at once when a task stops (with that task's error), and
fails when the deadline passes."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence

DEADLINE_S = 120.0  # liveness bound for a loaded machine
POLL_S = 0.1  # how often the condition is checked while the tasks run


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    tasks: Sequence[asyncio.Task],
    deadline_s: float = DEADLINE_S,
) -> None:
    """Check `condition` (a plain or an async function) until it holds; between checks, wait
    on the tasks themselves, so one that stops ends the wait at once."""
    if not tasks:
        raise ValueError("wait_for needs the tasks under test")
    deadline = time.monotonic() + deadline_s
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        stopped, _ = await asyncio.wait(tasks, timeout=POLL_S)
        for task in stopped:
            task.result()  # a task that raised raises here
            raise AssertionError(f"a task under test stopped while waiting for {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
