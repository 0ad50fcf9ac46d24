"""The worker's fence for relayed calls (runner/fence.py): a frame is taken only within its
take-by, counted from its arrival, and carries on the start-by it was given."""

from __future__ import annotations

import time

from dockyard.common.protocol import Frame, Status
from dockyard.runner.fence import take


def _frame(**extra) -> dict:
    return {"type": Frame.INVOKE, "id": "inv_1", "take_within": 0.4, "start_within": 5.0,
            **extra}


def test_a_fresh_frame_is_taken_with_its_start_by_on_this_hosts_clock():
    frame = _frame()
    before = time.monotonic()
    assert take(frame, time.time(), unix=False) is None
    assert before + 4.5 < frame["start_by"] <= time.monotonic() + 5.0


def test_a_frame_that_arrived_long_ago_is_refused_however_late_it_is_read():
    # The kernel's stamp says it arrived 3 s ago (the worker was stopped since).
    refusal = take(_frame(), time.time() - 3.0, unix=False)
    assert refusal["status"] == Status.NOT_STARTED and refusal["id"] == "inv_1"


def test_over_a_unix_socket_the_senders_absolute_times_decide():
    now = time.monotonic()
    assert take(_frame(take_by=now - 0.1, start_by=now + 5), None, unix=True)["status"] == \
        Status.NOT_STARTED
    frame = _frame(take_by=now + 0.4, start_by=now + 5)
    assert take(frame, None, unix=True) is None and frame["start_by"] == now + 5
    # Absolute times from a TCP peer (another host's clock) mean nothing: ignored.
    frame = _frame(take_by=now - 100, start_by=now - 100)
    assert take(frame, time.time(), unix=False) is None


def test_a_frame_with_a_take_within_that_is_not_a_number_is_refused():
    assert take(_frame(take_within="soon"), None, unix=False)["type"] == Frame.ERROR
