"""network = true without the host: a function's own network namespace with outbound NAT
(pasta). It reaches another host, but not the host's loopback (the control plane's port, a
worker's port), the host's own addresses, or the host's abstract Unix sockets."""

from __future__ import annotations

import os
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from urllib.parse import urlparse

import pytest




def _needs_pasta():
    if os.geteuid() != 0:
        pytest.skip("network namespaces and veth pairs need root")
    if shutil.which("pasta") is None and os.environ.get("CI") == "true":
        from devtools.packages import install
        install("passt")     # a fresh CI machine: the test run sets it up
    if shutil.which("pasta") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("pasta is not installed (apt-get install passt): the network "
                        "isolation of network = true cannot be tested")
        pytest.skip("pasta is not installed (apt-get install passt)")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def other_host():
    """Another machine on the network: a network namespace behind a veth pair, with a TCP
    server that answers a line. Yields (the host's address on that link, the other's)."""
    _needs_pasta()
    tag = secrets.token_hex(3)
    netns, here, there = f"dy-remote-{tag}", f"dyh{tag}", f"dyr{tag}"
    octet = int(tag[:2], 16) % 200 + 20
    host_address, remote_address = f"10.213.{octet}.1", f"10.213.{octet}.2"
    _ip("netns", "add", netns)
    server = None
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", netns)
        _ip("addr", "add", f"{host_address}/30", "dev", here)
        _ip("link", "set", here, "up")
        for args in (("addr", "add", f"{remote_address}/30", "dev", there),
                     ("link", "set", there, "up"), ("link", "set", "lo", "up")):
            _ip("netns", "exec", netns, "ip", *args)
        server = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c",
             "import socket\n"
             f"s = socket.create_server(({remote_address!r}, 8123))\n"
             "print('ready', flush=True)\n"
             "while True:\n"
             # The caller's request read first: a close with it still unread would be a
             # reset, which can overtake the answer (on a busy host, it did).
             "    c, _ = s.accept()\n"
             "    try:\n"
             "        c.settimeout(5); c.recv(1024); c.sendall(b'remote says hi')\n"
             "    except OSError:\n"
             "        pass\n"
             "    c.close()\n"],
            stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        yield host_address, remote_address
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


class _Listener:
    """A TCP (or abstract Unix) server of the host's that answers every connection."""

    def __init__(self, family, address):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.sendall(b"host service")
            conn.close()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


def test_a_function_with_network_reaches_other_hosts_but_not_the_host(server, pkg, other_host):
    host_on_link, remote = other_host
    workers = server.api("GET", "/api/workers").json()["workers"]
    summary = workers[0]["isolation"]["network_true"]
    assert summary["on"] is True and "pasta" in summary["how"], summary
    server.deploy(pkg("netprobe", name="net-probe"))
    control_port = urlparse(server.url).port
    loopback = _Listener(socket.AF_INET, ("127.0.0.1", 0))
    everywhere = _Listener(socket.AF_INET, ("0.0.0.0", 0))
    abstract_name = f"dockyard-test-{secrets.token_hex(4)}"
    abstract = _Listener(socket.AF_UNIX, "\0" + abstract_name)
    host_addresses = [a for a in _host_addresses() if a != "127.0.0.1"]
    try:
        targets = [{"kind": "tcp", "where": [remote, 8123]},
                   {"kind": "tcp", "where": ["127.0.0.1", control_port]},
                   {"kind": "tcp", "where": ["127.0.0.1", loopback.address[1]]},
                   {"kind": "tcp", "where": [host_on_link, everywhere.address[1]]},
                   {"kind": "abstract", "where": abstract_name},
                   {"kind": "vsock", "where": "any"}]
        targets += [{"kind": "tcp", "where": [a, everywhere.address[1]]} for a in host_addresses]
        answer = server.invoke("net-probe/dial", targets)
        assert answer.status_code == 200, answer.text
        results = answer.json()
        assert results[f"tcp:{[remote, 8123]}"] == "reached: remote says hi", results
        for key, outcome in results.items():
            if key != f"tcp:{[remote, 8123]}":
                assert outcome.startswith("refused"), (key, outcome)
        # A namespace of its own: no host interface is visible.
        names = server.invoke("net-probe/interfaces", None).json()
        assert host_on_link not in names and not any(n.startswith("dyh") for n in names)
        # Its pasta holds no inotify instance (a user has 128: one per function process
        # would starve the deploy folder's watcher, and pasta itself, of them).
        pastas = [process for process in server.descendants()
                  if process.name() in ("pasta", "passt", "passt.avx2", "pasta.avx2")]
        assert pastas
        for process in pastas:
            links = [os.readlink(f"/proc/{process.pid}/fd/{fd}")
                     for fd in os.listdir(f"/proc/{process.pid}/fd")]
            assert not [link for link in links if "inotify" in link], links
    finally:
        for listener in (loopback, everywhere, abstract):
            listener.close()


def _host_addresses() -> list[str]:
    import psutil
    return sorted({a.address for addresses in psutil.net_if_addrs().values() for a in addresses
                   if a.family == socket.AF_INET})


def test_without_pasta_the_summary_says_the_host_network_is_shared(monkeypatch, caplog):
    from dockyard.sandbox import isolation as isolation_module
    from dockyard.sandbox.isolation import Isolation
    from dockyard.sandbox.view import HostLayout, sandbox_spec

    real_which = shutil.which
    monkeypatch.setattr(isolation_module.shutil, "which",
                        lambda name, path=None: None if name == "pasta"
                        else real_which(name, path=path))
    layout = HostLayout()
    with caplog.at_level("WARNING", logger="dockyard.isolation"):
        note = Isolation._probe_nat(layout)
    assert layout.nat is None
    assert note.startswith("host:") and "apt-get install passt" in note
    assert [r for r in caplog.records if "pasta is not installed" in r.getMessage()]
    spec = sandbox_spec(layout, root="/r", code="/c", venv="/v", bootstrap="/b", uid=None,
                        gid=None, tmp_mb=16, network=True, rlimits={}, env={})
    assert spec["nat"] is None
    # With pasta, a spec for network = true carries it and the host's addresses to close.
    layout.nat = {"pasta": "/usr/bin/pasta"}
    spec = sandbox_spec(layout, root="/r", code="/c", venv="/v", bootstrap="/b", uid=None,
                        gid=None, tmp_mb=16, network=True, rlimits={}, env={})
    assert spec["nat"]["pasta"] == "/usr/bin/pasta" and "127.0.0.1" not in spec["nat"]["block"]
    off = sandbox_spec(layout, root="/r", code="/c", venv="/v", bootstrap="/b", uid=None,
                       gid=None, tmp_mb=16, network=False, rlimits={}, env={})
    assert off["nat"] is None
