"""Work that nothing waits for, at a lower CPU priority than the work that others wait for.

A pass runs its steps side by side. Some of them only inform (a check that is not blocking: analysts
read its result, no step waits for it), yet on a machine with few cores they take CPU from the steps on
the pass's critical path: measured on 2 cores, the stuck-jobs check took a whole core for 8 s while the
vendor steps asked their first jobs, and the slowest vendor asked them slower.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# Linux's nice value of a thread that yields the CPU to normal threads when both want it (0 normal, 19 least).
BACKGROUND_NICENESS = 10


def at_low_priority(work: Callable[[], T], niceness: int = BACKGROUND_NICENESS) -> T:
    """`work()`'s result (or its error), computed in a thread of its own at nice `niceness`.

    Linux keeps a nice value per thread, so only that thread is lowered: the caller and the rest of the
    process keep theirs, and nothing needs restoring (raising priority back would need privileges),
    whatever executor runs the step (its own process, the run's process, a Celery worker that runs
    later tasks). Elsewhere (macOS has no per-thread nice value) `work` runs at normal priority.
    """
    if not sys.platform.startswith("linux"):
        return work()

    def lowered() -> T:
        thread = threading.get_native_id()
        # This thread only (Linux). Never higher than it already is: that would need privileges.
        os.setpriority(os.PRIO_PROCESS, thread, max(niceness, os.getpriority(os.PRIO_PROCESS, thread)))
        return work()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="low-priority") as pool:
        return pool.submit(lowered).result()
