"""A function that writes its own process's slot page (the bootstrap's Slot, found through gc)
to make the worker believe what it did not measure: a call in hand that never ends, a call
id that forges a log line, calls served that nobody sent, a call in hand nobody sent."""

import gc
import os
import signal
import struct
import threading
import time

LAYOUT = struct.Struct("=IIQddI")
FORGED_LINE = "WARNING dockyard.worker: admin token rotated by slotforger"
NEWLINE_ID = "inv_0\n" + FORGED_LINE
STRANGER_ID = "inv_00000000000000000000beef"
BOOT = time.time()


def _slot_map():
    for obj in gc.get_objects():
        if type(obj).__name__ == "Slot" and hasattr(obj, "LAYOUT") and hasattr(obj, "map"):
            return obj.map
    raise RuntimeError("no slot found")


def _write(page, busy, served, started, call_id):
    raw = call_id.encode("utf-8")[:128]
    page[LAYOUT.size:LAYOUT.size + len(raw)] = raw
    LAYOUT.pack_into(page, 0, busy, 0, served, started, 0.0, len(raw))


def _forge_busy(page, seconds):
    """Show a call in hand with a start that keeps moving and the forged id, burning CPU."""
    end = time.monotonic() + seconds
    served = LAYOUT.unpack_from(page)[2]
    while time.monotonic() < end:
        _write(page, 1, served, time.monotonic(), NEWLINE_ID)
        burn_until = time.monotonic() + 0.01
        while time.monotonic() < burn_until:
            pass


def boot(event):
    return {"boot": BOOT, "pid": os.getpid()}


def echo(event):
    return event


def forge_and_spin(event):
    """Never return: the slot claims a call that keeps starting anew."""
    _forge_busy(_slot_map(), float(event.get("seconds", 600)))
    return "survived"


def _resist_stopping():
    """Ignore SIGTERM, and the worker's shutdown frame (the bootstrap's own loop, patched)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for obj in gc.get_objects():
        if type(obj).__name__ == "Child" and hasattr(obj, "serve_channels"):
            serve = obj._serve
            obj._serve = lambda fd, serve=serve: serve(fd) and False


def forge_after_return(event):
    """Return at once, and leave a thread burning CPU behind a slot that claims a call
    (`resist`: and ignore being asked to stop)."""
    if event.get("resist"):
        _resist_stopping()
    page = _slot_map()
    threading.Thread(target=_forge_busy, args=(page, float(event.get("seconds", 600))),
                     daemon=True).start()
    time.sleep(0.05)
    return "returned"


def _keep_writing(page, seconds, busy, served, call_id):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        _write(page, busy, served, time.monotonic(), call_id)
        time.sleep(0.005)


def forge_served(event):
    """Claim many more calls served than were ever sent (no call in hand)."""
    page = _slot_map()
    threading.Thread(target=_keep_writing,
                     args=(page, float(event.get("seconds", 600)), 0,
                           int(event.get("served", 1000)), STRANGER_ID),
                     daemon=True).start()
    return "forged"


def _claim(page, seconds, served, call_id):
    time.sleep(0.1)     # past the reply, which takes what was printed during the call
    print("forged output", flush=True)
    _keep_writing(page, seconds, 1, served, call_id)


def claim_call(event):
    """Return at once, and leave a thread behind that prints, then shows a call in hand named
    `id` (another container's call, say) for `seconds`: its output passed off as that
    call's."""
    page = _slot_map()
    served = LAYOUT.unpack_from(page)[2] + 1    # this call's end is counted as it returns
    threading.Thread(target=_claim, args=(page, float(event.get("seconds", 3)), served,
                                          str(event["id"])), daemon=True).start()
    return "claimed"


def forge_stranger(event):
    """While its own call is in hand, name a well-formed call that was never sent here."""
    page = _slot_map()
    served = LAYOUT.unpack_from(page)[2]
    seconds = float(event.get("seconds", 600))
    threading.Thread(target=_keep_writing, args=(page, seconds, 1, served, STRANGER_ID),
                     daemon=True).start()
    time.sleep(seconds)
    return "forged"
