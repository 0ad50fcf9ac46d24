"""Tries to reach what it is given: TCP addresses, UDP and abstract Unix sockets. Used to
show what a function with network = true can and cannot reach."""

import socket


def dial(event):
    results = {}
    for target in event:
        kind, where = target["kind"], target["where"]
        key = f"{kind}:{where}"
        try:
            if kind == "tcp":
                with socket.create_connection((where[0], where[1]), timeout=3) as sock:
                    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    results[key] = "reached: " + sock.recv(64).decode("latin-1")
            elif kind == "abstract":
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(3)
                    sock.connect("\0" + where)
                    results[key] = "reached: " + sock.recv(64).decode("latin-1")
            elif kind == "vsock":
                socket.socket(40, socket.SOCK_STREAM).close()   # AF_VSOCK
                results[key] = "reached: a vsock socket opened"
        except OSError as exc:
            results[key] = f"refused: {type(exc).__name__}: {exc}"
    return results


def interfaces(event):
    return sorted(name for _, name in socket.if_nameindex())
