"""The control planes a worker knows (`dockyard worker --server A --server B`), in order. It
talks to one at a time, the current one. A request to it that gets no answer (the connection
refused, reset or timed out) or a 5xx is made again at once to the next one, which becomes
the current one; a 4xx is an answer (a 401 is a refusal) and goes back to the caller as it is.
They all share one store, so a worker's id and its versions are the same on each: only where
its requests go changes. Changes are logged, one line each, never every attempt."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import requests
import urllib3

log = logging.getLogger("dockyard.worker")

T = TypeVar("T")


class ServerError(Exception):
    """A control plane answered 5xx: it is there but cannot serve; the next one is tried."""

    def __init__(self, url: str, status: int):
        super().__init__(f"HTTP {status}")
        self.url = url
        self.status = status


@dataclass(frozen=True)
class Failure:
    url: str
    reason: str
    # False when the request certainly never reached it (the connection was refused or never
    # made); True when it may have been handled before the answer was lost.
    may_have_arrived: bool


class Unreachable(requests.ConnectionError):
    """No control plane answered this request."""

    def __init__(self, failures: Sequence[Failure]):
        super().__init__("; ".join(f"{f.url}: {f.reason}" for f in failures))
        self.failures = list(failures)


# What says a control plane is down or cannot serve (rather than that it answered no).
FAILOVER = (requests.ConnectionError, requests.Timeout,
            requests.exceptions.ChunkedEncodingError, ServerError)


def parse(values: Sequence[str]) -> list[str]:
    """Control plane URLs from options that may each hold several, separated by commas or
    spaces (`--server A --server B`, `DOCKYARD_SERVER=A,B`); the order kept, repeats
    dropped. ValueError names a value that is not an http(s) URL."""
    urls: list[str] = []
    for value in values:
        for item in re.split(r"[,\s]+", value or ""):
            if not item:
                continue
            if not re.match(r"https?://[^/\s]+", item):
                raise ValueError(f"'{item}' is not a control plane URL (http://HOST:PORT)")
            url = item.rstrip("/")
            if url not in urls:
                urls.append(url)
    return urls


class ControlPlanes:
    def __init__(self, urls: Sequence[str], session: requests.Session):
        self.urls = parse(urls)
        if not self.urls:
            raise ValueError("no control plane URL")
        self.session = session
        self._lock = threading.Lock()
        self._current = 0
        self._down = False      # the last round found none answering (said once, in the log)

    @property
    def current(self) -> str:
        return self.urls[self._current]

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        """`session.request` to the current control plane, else the next ones in turn. The
        response carries `server` (the URL of the one that answered) and `failures` (what
        went wrong with the ones tried before it)."""
        failures: list[Failure] = []

        def exchange(base: str) -> requests.Response:
            response = self.session.request(method, base + path, **kwargs)
            if response.status_code >= 500:
                response.close()
                raise ServerError(base, response.status_code)
            response.server = base
            return response

        response = self.call(exchange, failures)
        response.failures = failures
        return response

    def download(self, path: str, dest: Path, timeout: float) -> None:
        """GET `path` into the file `dest`, from the start again on the next control plane if
        the current one goes away midway."""
        def fetch(base: str) -> None:
            with self.session.get(base + path, stream=True, timeout=timeout) as response:
                if response.status_code >= 500:
                    raise ServerError(base, response.status_code)
                response.raise_for_status()
                with open(dest, "wb") as out:
                    for chunk in response.iter_content(1 << 20):
                        out.write(chunk)
        self.call(fetch)

    def call(self, exchange: Callable[[str], T], failures: list[Failure] | None = None) -> T:
        """`exchange(base_url)` with the current control plane, else with the next ones in
        turn, each tried once; an exchange that raises anything but a sign of a control plane
        down (FAILOVER) ends it with that. Unreachable when none answers."""
        failures = [] if failures is None else failures
        with self._lock:
            start = self._current
        count = len(self.urls)
        for step in range(count):
            url = self.urls[(start + step) % count]
            try:
                result = exchange(url)
            except FAILOVER as exc:
                failures.append(Failure(url, reason(exc), _may_have_arrived(exc)))
                continue
            self._answered(url, failures)
            return result
        self._none_answered(failures)
        raise Unreachable(failures)

    def _answered(self, url: str, failures: list[Failure]) -> None:
        with self._lock:
            before, was_down = self.urls[self._current], self._down
            self._current, self._down = self.urls.index(url), False
        if was_down:
            log.warning("control plane %s answers again%s", url,
                        "; using it" if len(self.urls) > 1 else "")
        elif url != before:
            why = next((f.reason for f in failures if f.url == before), "it failed earlier")
            log.warning("control plane %s is unreachable (%s); using %s", before, why, url)

    def _none_answered(self, failures: list[Failure]) -> None:
        with self._lock:
            if self._down:
                return
            self._down = True
        if len(self.urls) == 1:
            log.warning("control plane %s is unreachable (%s); trying again until it answers",
                        failures[0].url, failures[0].reason)
        else:
            log.warning("no control plane answers (%s); trying them in turn until one does",
                        "; ".join(f"{f.url}: {f.reason}" for f in failures))


def reason(exc: BaseException) -> str:
    """What went wrong, in a few words: `connection refused`, `timed out`, `HTTP 503`."""
    if isinstance(exc, ServerError):
        return str(exc)
    if isinstance(exc, requests.ConnectTimeout):
        return "connecting timed out"
    if isinstance(exc, requests.Timeout):
        return "no answer in time"
    cause = _cause(exc)
    text = str(cause or exc)
    # urllib3 names the connection before the cause: keep the cause.
    text = text.split("Failed to establish a new connection: ")[-1]
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text).strip("()'\" ")
    return (text or type(exc).__name__)[:200]


def _cause(exc: BaseException) -> BaseException | None:
    """The innermost error urllib3 wrapped (a refused connection, a reset, a closed one)."""
    inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
    if isinstance(inner, urllib3.exceptions.MaxRetryError) and inner.reason is not None:
        inner = inner.reason
    if isinstance(inner, urllib3.exceptions.ProtocolError) and len(inner.args) > 1 and \
            isinstance(inner.args[1], BaseException):
        inner = inner.args[1]
    return inner


def _may_have_arrived(exc: BaseException) -> bool:
    if isinstance(exc, requests.ConnectTimeout):
        return False
    return not isinstance(_cause(exc), urllib3.exceptions.NewConnectionError)
