"""reconcile.priority: work nothing waits for runs in a thread of lower CPU priority, and only that thread."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from reconcile.priority import BACKGROUND_NICENESS, at_low_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread: Linux")


def _nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_the_work_runs_lowered_and_the_caller_keeps_its_priority() -> None:
    before = _nice_of_this_thread()
    seen = at_low_priority(lambda: (threading.get_native_id(), _nice_of_this_thread()))
    worker, nice = seen
    assert worker != threading.get_native_id()  # a thread of its own
    assert nice == max(before, BACKGROUND_NICENESS) and nice > 0
    assert _nice_of_this_thread() == before  # the caller (and so the step's process) is untouched
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def test_the_works_error_is_the_callers() -> None:
    def fails() -> None:
        raise LookupError("the check's own error")

    with pytest.raises(LookupError, match="the check's own error"):
        at_low_priority(fails)
    assert at_low_priority(lambda: 42) == 42
