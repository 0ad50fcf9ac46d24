"""The watchdog's judgement of a one-at-a-time process, look by look: on the worker's own
account of its calls (witness.py), with the process's slot held against it as a hint. What it
decides, process.py does (kill, with the reason, or cancel)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..common.direct import call_id_ok
from .witness import Call, View, Witness

# A web thread marks an answer a moment after the process wrote it (it must be scheduled): a
# call is past its timeout only this much later.
MEASURED_GRACE_S = 0.25
# A slot that contradicts the ledger must do so this long before the process is killed for it:
# a look may fall between a reply and the process's update of its slot.
VIOLATION_S = 0.5
# Where the slot is all there is (see DirectWatch): a call is killed this long past its timeout
# (seen so on two looks in a row).
TIMEOUT_GRACE_S = 0.05
# How often the CPU of a process with no call is read against its between-calls allowance.
BUDGET_LOOK_S = 0.2
# The web thread's own wait beyond a call's queue time and timeout (app/direct_calls.py).
REPLY_GRACE_S = 2.0


@dataclass
class Verdict:
    action: str             # CANCEL, TIMED_OUT, BROKE_PROTOCOL or OVER_BUDGET
    call_id: str = ""       # the call it is about ("" when no measured call is)
    reason: str = ""


CANCEL, TIMED_OUT, BROKE_PROTOCOL, OVER_BUDGET = (
    "cancel", "timed_out", "broke_protocol", "over_budget")


class DirectWatch:
    """Decides, look by look, what becomes of a one-at-a-time process whose calls may come
    straight from web threads. Where every channel is in the ledger (the web side keeps it),
    the decisions rest on the Witness only: a call is past its timeout when the process has
    had calls sent and answered none for `timeout` since the later of the oldest one's sending
    and the last answer (it serves one at a time); the CPU budget is armed when a measured call
    begins and checked whenever none is in hand; and the slot is held against the ledger:
    one that claims more calls served than were sent, a call in hand when none was sent, or a
    call that was never sent is a broken protocol. Where some channel is not in the ledger (a
    web side that does not keep it) the process's calls there go unseen: the slot is then all
    there is to time them by, as a hint (a call it shows is killed past its timeout; the web
    thread's own deadline ends a call it hides), and a process is judged on the ledger again
    only once it has settled: its slot showed no call, or the longest a hidden call could
    last went by."""

    def __init__(self, witness: Witness, slot, budget, queue_wait: float):
        self.witness = witness
        self.slot = slot
        self.budget = budget
        self.queue_wait = queue_wait
        self.last_hint = (False, 0, 0.0, 0.0, "")
        self.settled = True             # judged on the ledger (a new process has no history)
        self.unwitnessed_at = 0.0
        self.served_base = 0            # calls served before it was judged on the ledger
        self.claim: tuple | None = None     # (what the slot claims against the ledger, since)
        self.busy_since: float | None = None
        self.overdue: object = None     # what was past its timeout on the last look
        self.next_budget_look = 0.0
        self.armed = (0, "")            # (slot only) the call the CPU budget was armed for
        self.settled_served = 0         # (slot only) calls counted at the last budget check

    # -- the slot, as a hint ------------------------------------------------------------------

    def hint(self) -> tuple[bool, int, float, float, str]:
        """What the slot shows: (a call in hand, calls served, when it started, when the last
        ended, its id — "" unless it has the form of a call id)."""
        slot = self.slot
        if slot is None:
            return self.last_hint
        try:
            busy, served, started, ended, call_id = slot.read()
        except ValueError:      # closed meanwhile: the process is gone
            return self.last_hint
        self.last_hint = (busy, served, started, ended, call_id if call_id_ok(call_id) else "")
        return self.last_hint

    def busy_hint(self) -> bool:
        """The slot's busy flag alone (on every pick of a process for a relayed call)."""
        slot = self.slot
        try:
            return slot.busy if slot is not None else self.last_hint[0]
        except ValueError:
            return self.last_hint[0]

    # -- looks ----------------------------------------------------------------------------------

    def _judged(self, view: View, hint, now: float, timeout: float) -> bool:
        """Whether this look judges on the ledger (see the class's docstring)."""
        if not view.witnessed:
            self.settled = False
            self.unwitnessed_at = now
            return False
        if not self.settled:
            if hint[0] and now - self.unwitnessed_at < self.queue_wait + timeout + REPLY_GRACE_S:
                return False
            self.settled = True
            self.served_base = max(0, hint[1] - view.sent)
            self.claim = self.busy_since = self.overdue = None
        return True

    def look(self, now: float, timeout: float, cancelled) -> Verdict | None:
        view = self.witness.look(now)
        hint = self.hint()
        if not self._judged(view, hint, now, timeout):
            return self._look_on_slot(now, timeout, cancelled, hint)
        busy, served, _, _, slot_call = hint
        for call in view.calls:
            if call.call_id in cancelled and self.witness.started(call.call_id):
                return Verdict(CANCEL, call.call_id)
        verdict = self._hold_to_ledger(view, busy, served, slot_call, now)
        if verdict is not None:
            return verdict
        if not busy:
            self.witness.orphans_done()
        if not view.calls:
            self.overdue = None
            return self._between_calls(now)
        since = max(view.calls[0].sent_at, view.last_answer)
        if since != self.busy_since:
            # A call began (as far as anyone but the process can tell).
            self.busy_since = since
            if self.budget is not None and self.budget.by_kernel:
                self.budget.arm()
        if now <= since + timeout + MEASURED_GRACE_S:
            self.overdue = None
            return None
        if self.overdue != since:
            self.overdue = since    # on the next look too, then it goes
            return None
        return Verdict(TIMED_OUT, self.in_hand(view.calls))

    def _hold_to_ledger(self, view: View, busy: bool, served: int, slot_call: str,
                        now: float) -> Verdict | None:
        """A slot that claims what the ledger contradicts, for VIOLATION_S: a broken
        protocol."""
        if served - self.served_base > view.sent:
            claim = ("served", f"its slot claims {served - self.served_base} calls served; "
                               f"{view.sent} were sent to it")
        elif busy and not view.calls:
            claim = ("busy", "its slot claims a call in hand; none was sent to it")
        elif busy and slot_call and slot_call not in {call.call_id for call in view.calls}:
            claim = ("unknown", "its slot names a call in hand that was not sent to it")
        else:
            self.claim = None
            return None
        if self.claim is None or self.claim[0] != claim[0]:
            self.claim = (claim[0], now)
            return None
        if now - self.claim[1] < VIOLATION_S:
            return None
        return Verdict(BROKE_PROTOCOL, reason=claim[1])

    def _between_calls(self, now: float) -> Verdict | None:
        budget = self.budget
        if self.busy_since is not None:
            # Its last call was answered: what the tree burns from now on is held to a budget.
            self.busy_since = None
            if budget is not None:
                budget.settle()
            self.next_budget_look = now + BUDGET_LOOK_S
            return None
        if budget is None or now < self.next_budget_look:
            return None
        self.next_budget_look = now + BUDGET_LOOK_S
        return Verdict(OVER_BUDGET) if budget.exceeded() else None

    def _look_on_slot(self, now: float, timeout: float, cancelled, hint) -> Verdict | None:
        """Some calls go unseen: what the slot shows is timed, with no more trust than its
        timeout kill needs (see the class's docstring)."""
        busy, served, started, _, call_id = hint
        if busy and call_id and call_id in cancelled:
            return Verdict(CANCEL, call_id)
        budget = self.budget
        if budget is not None and budget.by_kernel and (served, call_id) != self.armed:
            # No faster than the CPUs it may use allow (see CpuBudget.arm).
            self.armed = (served, call_id)
            budget.arm(now)
        if not busy or started + timeout + TIMEOUT_GRACE_S > now:
            self.overdue = None
            return None
        if self.overdue != (call_id, started):
            self.overdue = (call_id, started)
            return None
        # Named only if the worker relayed it: an id the process wrote is not logged.
        return Verdict(TIMED_OUT, call_id if call_id in self.witness.relayed else "")

    def idle_check(self) -> bool:
        """Between calls, where the slot is all there is (see `look` for the rest): True if
        the process went on burning CPU past its last call's budget."""
        budget = self.budget
        if budget is None or self.settled:
            return False
        busy, served = self.hint()[:2]
        if busy:
            return False
        if served != self.settled_served:
            self.settled_served = served
            budget.settle()
            return False
        return budget.exceeded()

    # -- what the pool and the web threads' questions see -------------------------------------

    def in_hand(self, calls: list[Call]) -> str:
        """Of the calls sent and not answered, the one the process took off its channel (the
        oldest such, if a process took several); "" if it took none."""
        taken = [call for call in calls if self.witness.started(call.call_id)]
        return taken[0].call_id if taken else ""

    def state(self, now: float) -> tuple[bool, int, float, float, str]:
        """(a call in hand, calls served, since when, when the last was answered, its id):
        measured where the process is judged on the ledger, else what its slot shows."""
        if not self.settled:
            return self.hint()
        view = self.witness.look(now)
        if not view.witnessed:
            return self.hint()
        if not view.calls:
            return False, view.sent, 0.0, view.last_answer, ""
        since = max(view.calls[0].sent_at, view.last_answer)
        return True, view.sent, since, view.last_answer, self.in_hand(view.calls)

    def in_hand_now(self) -> str:
        """The call in hand as measured ("" where the process is not judged on the ledger)."""
        if not self.settled:
            return ""
        view = self.witness.look(time.monotonic())
        return self.in_hand(view.calls) if view.witnessed and view.calls else ""

    def working(self, now: float, timeout: float, call_id: str) -> bool:
        """Whether the process is busy with another call, and not past its timeout, or just
        finished one: it did not read `call_id` for that reason."""
        busy, _, since, ended, running = self.state(now)
        if busy and running != call_id and since + timeout > now:
            return True
        return ended > now - (self.queue_wait + 1.0)
