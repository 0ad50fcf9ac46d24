"""How `serve` stops (Supervisor's part that does it). The first SIGTERM or Ctrl-C: the web
processes answer each new call 503 `Stopping` and /healthz `stopping` (app/stopping.py), the
deploy-folder watcher and the scheduler stop, the dispatcher claims no more calls; the calls
under way end on a worker that is still up, and serve says what it waits for, again when that
changes; then the local worker stops (it tells the control plane so while that is there to
hear it), then the web processes. A second signal, whenever it comes, stops the calls at once
(see _halt), and serve is gone within about HALT_WITHIN_S."""

from __future__ import annotations

import math
import os
import select
import time

from ..app.processes.web import GRACEFUL_WAIT_S
from ..app.processes.worker import STOP_REASON
from ..app.serve_state import HALTING, STOPPING, InFlight
from ..app.stopping import timeout_s

HALT_WITHIN_S = 3.5


class ServeStop:
    """Uses the Supervisor's web, worker, dispatcher, scheduler, deploy_watcher, data,
    signals (those received, in order) and wake_read (written to on each)."""

    def stop_processes(self) -> None:
        """The stop itself (see above); returns once every process serve started is gone."""
        if self.web is not None:
            self.web.set_state(STOPPING)
        helpers = [h for h in (self.deploy_watcher, self.scheduler) if h is not None]
        for helper in helpers:
            helper.terminate()
        for helper in helpers:
            helper.wait_stopped()
        if self.dispatcher:
            self.dispatcher.stop_claiming()
        timeouts: dict = {}
        until = self._wait_for_calls(timeouts)
        if self.worker is not None:
            self.worker.terminate()
            if until is not None and self.web is not None:
                self.web.quit()     # both at once: the calls are answered already
            until = self._wait_exit(self.worker.proc, until, self.worker.stop_grace_s,
                                    timeouts)
            self.worker.wait_stopped(0)     # killed if it is still there
        if self.web is not None:
            if until is None:
                self.web.terminate()
            until = self._wait_exit(self.web.proc, until, GRACEFUL_WAIT_S, timeouts)
            self.web.finish()               # at once if it is still there
        if self.dispatcher:
            self.dispatcher.stop(wait=until is None)

    def _in_flight(self, timeouts: dict) -> InFlight | None:
        """The calls this serve waits for: its web processes' (None until each has said) and
        its dispatcher's."""
        web = self.web.in_flight() if self.web is not None else InFlight()
        if web is None:
            return None
        for row in self.dispatcher.in_flight() if self.dispatcher else []:
            key = (row["container"], row["version"])
            if key not in timeouts:
                timeouts[key] = timeout_s(self.data.db_target, *key)
            started, timeout = row.get("started_at"), timeouts[key]
            web += InFlight(1, started + timeout if started and timeout is not None else None)
        return web

    def _wait_for_calls(self, timeouts: dict) -> float | None:
        """Until the calls under way have ended, saying what it waits for when that changes.
        None once they have; after a second signal, the time (monotonic) by which serve is
        to be gone (see _halt)."""
        said = None
        while True:
            if len(self.signals) > 1:
                return self._halt(timeouts)
            calls = self._in_flight(timeouts)
            if calls is not None and calls.calls != said and (calls.calls or self.signals):
                print(_waiting(calls), flush=True)
                said = calls.calls
            if calls is not None and not calls.calls:
                return None
            self._wait_signal(0.1)

    def _wait_exit(self, proc, until: float | None, limit_s: float,
                   timeouts: dict) -> float | None:
        """Wait for `proc` to exit: for up to `limit_s`, or until `until` once a second
        signal halted the calls (which it does if one comes meanwhile). Returns `until`."""
        end = time.monotonic() + limit_s
        while proc is not None and proc.poll() is None:
            if until is None and len(self.signals) > 1:
                until = self._halt(timeouts)
                if self.web is not None:
                    self.web.quit()
            if time.monotonic() >= (end if until is None else min(end, until)):
                break
            self._wait_signal(0.1)
        return until

    def _wait_signal(self, seconds: float) -> None:
        ready, _, _ = select.select([self.wake_read], [], [], seconds)
        if ready:
            os.read(self.wake_read, 4096)

    def _halt(self, timeouts: dict) -> float:
        """Stop every call now: the web processes answer no new call; the dispatcher records
        its calls cancelled ("server stopped") and has the workers stop them; the local
        worker stops every process it runs, and the calls they had (direct and relayed
        alike) are answered cancelled, "server stopped", which their web threads record.
        Waits (a little) for those answers; returns the time by which serve is to be gone."""
        until = time.monotonic() + HALT_WITHIN_S
        calls = self._in_flight(timeouts) or InFlight()
        print(f"stopping: cancelling {_calls(calls.calls)} now" if calls.calls else
              "stopping now", flush=True)
        if self.web is not None:
            self.web.set_state(HALTING)
        if self.dispatcher:
            self.dispatcher.halt(STOP_REASON)
        if self.worker is not None:
            self.worker.halt()
        while time.monotonic() < until - 1.5:
            calls = self._in_flight(timeouts)
            if calls is not None and not calls.calls:
                time.sleep(0.1)     # their records, written by the web processes meanwhile
                break
            time.sleep(0.05)
        return until


def _calls(n: int) -> str:
    return f"{n} call" if n == 1 else f"{n} calls"


def _waiting(calls: InFlight) -> str:
    """serve's line while it stops: what it waits for."""
    if not calls.calls:
        return "stopping: no calls under way"
    left = ""
    if calls.last_deadline is not None:
        seconds = max(0, math.ceil(calls.last_deadline - time.time()))
        left = f", {'longest ' if calls.calls > 1 else ''}{seconds} s left"
    return (f"stopping: waiting for {_calls(calls.calls)}{left}; Ctrl-C again to stop "
            f"{'them' if calls.calls > 1 else 'it'} now")
