"""A tenant that attacks what is around its sandbox rather than the sandbox itself: it forges
the reply frames its process sends (the fields a worker reports in every invocation record),
and it holds bare connections open to a worker's invoke port."""

import gc
import socket
import time

# The fields every reply of this process carries from now on, whatever their type.
FORGED = {}


def _child_class():
    """The bootstrap's Child class: the bootstrap runs as __main__ in this same process."""
    import __main__
    found = getattr(__main__, "Child", None)
    if found is not None:
        return found
    for obj in gc.get_objects():
        kind = type(obj)
        if hasattr(kind, "send") and hasattr(kind, "run_call"):
            return kind
    raise LookupError("no bootstrap in this process")


def forge(event):
    """From this reply on (this one included), every reply frame this process writes carries
    the fields of `event` in place of the bootstrap's own: a memory figure that is an object,
    a duration that is a string, a cold flag that is a list, megabytes of output..."""
    child = _child_class()
    FORGED.clear()
    FORGED.update(event or {})
    if not getattr(child, "_forged", False):
        original = child.send

        def send(self, obj, result_json=None, channel=None):
            if isinstance(obj, dict) and obj.get("type") == "result":
                obj = dict(obj, **FORGED)
                if "result" in FORGED:
                    result_json = None
            return original(self, obj, result_json, channel)

        child.send = send
        child._forged = True
    return {"forging": sorted(FORGED)}


def hold(event):
    """Keep `count` bare connections (never a byte sent) open to host:port for `seconds`,
    opening a new one as soon as the other end closes one. Returns how many were opened in
    all, how many the other end closed, and the first error met."""
    address = (event["host"], int(event["port"]))
    count, until = int(event.get("count", 17)), time.monotonic() + float(event["seconds"])
    held, opened, closed, error = [], 0, 0, None
    while time.monotonic() < until:
        while len(held) < count and time.monotonic() < until:
            try:
                held.append(socket.create_connection(address, timeout=2))
                opened += 1
            except OSError as exc:
                error = error or f"{type(exc).__name__}: {exc}"
                time.sleep(0.05)
                break
        still = []
        for sock in held:
            sock.setblocking(False)
            try:
                sock.recv(4096)     # the end, or a last word before it: either way, gone
                gone = True
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                sock.close()
                closed += 1
            else:
                still.append(sock)
        held = still
        time.sleep(0.02)
    for sock in held:
        sock.close()
    return {"opened": opened, "closed": closed, "error": error}
