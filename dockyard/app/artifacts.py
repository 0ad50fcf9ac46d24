"""Content-addressed store of uploaded packages: `artifacts/<sha256>` in the data dir. With a
shared database (PostgreSQL) the database holds them too, and the data dir's files are this
host's copies: a control plane that lacks one fetches it from the database."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import IO

from ..errors import TooLarge
from .store import artifact_chunks as chunks

CHUNK = 1 << 20
PREFIX = "upload-"
# A temp upload untouched this long belongs to a request whose process died (a request that
# fails removes its own): the next upload removes it.
STALE_UPLOAD_S = 3600
LOCK_NAME = ".lock"      # not a sha256, so never an artifact's name


class ArtifactStore:
    def __init__(self, root: Path, uploads: Path, shared_db=None):
        self.root = root
        self.uploads = uploads
        self.shared_db = shared_db     # the database target when it holds the packages too

    @classmethod
    def of(cls, data) -> "ArtifactStore":
        """The store of a data dir (DataDir), with its shared database if it has one."""
        return cls(data.artifacts, data.uploads, data.db_target if data.shared_db else None)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256")
        return self.root / sha256

    def local(self, sha256: str) -> Path:
        """The package file on this host, fetched from the shared database when missing
        (FileNotFoundError when neither has it)."""
        path = self.path(sha256)
        if self.shared_db is None:
            if not path.exists():
                raise FileNotFoundError(sha256)
            return path
        if not chunks.has(_db(self.shared_db), sha256):
            # Removed by retention on another host: this host's copy goes too.
            path.unlink(missing_ok=True)
            raise FileNotFoundError(sha256)
        if path.exists():
            return path
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.uploads, prefix=PREFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                found = chunks.copy_to(_db(self.shared_db), sha256, _Hashing(out, digest))
            if not found:
                raise FileNotFoundError(sha256)
            if digest.hexdigest() != sha256:
                raise FileNotFoundError(f"{sha256}: the stored bytes do not match their hash")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def receive(self, stream: IO[bytes], max_bytes: int) -> tuple[Path, str, int]:
        """Spool an upload to a temp file, hashing as it streams; refuse past `max_bytes`
        without holding the body in memory. Returns (temp path, sha256, size)."""
        self.sweep()
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.uploads, prefix=PREFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                while True:
                    chunk = stream.read(CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(
                            f"package is larger than {max_bytes // (1 << 20)} MB compressed; "
                            "split it or raise the upload limit")
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            os.unlink(tmp)
            raise
        return Path(tmp), digest.hexdigest(), size

    def sweep(self, older_than: float = STALE_UPLOAD_S) -> int:
        """Remove temp uploads not written to for `older_than` seconds; returns how many."""
        cutoff = time.time() - older_than
        removed = 0
        try:
            entries = list(os.scandir(self.uploads))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.startswith(PREFIX):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and \
                        entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # another request removed it first
                pass
        return removed

    def keep(self, tmp: Path, sha256: str) -> Path:
        """Move a received upload into place (a no-op when the same bytes are stored)."""
        final = self.path(sha256)
        if self.shared_db is not None:
            chunks.put(_db(self.shared_db), sha256, final if final.exists() else tmp)
        if final.exists():
            tmp.unlink(missing_ok=True)
        else:
            os.chmod(tmp, 0o600)
            os.replace(tmp, final)
        return final

    @contextlib.contextmanager
    def lock(self, exclusive: bool = False):
        """Shared: an upload between storing its artifact and recording its version.
        Exclusive: removing artifacts no version uses; so an artifact an upload is about to
        use is never removed under it (the same bytes uploaded again share the file)."""
        if self.shared_db is not None:      # every control plane takes the same lock
            db = _db(self.shared_db)
            chunks.lock(db, exclusive)
            try:
                yield
            finally:
                chunks.unlock(db, exclusive)
            return
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)   # releases the lock

    def remove_unused(self, sha256s, in_use) -> list[str]:
        """Remove the artifacts among `sha256s` that `in_use(sha256s)` (a set, read from the
        database under the lock) does not name; returns those removed."""
        removed = []
        with self.lock(exclusive=True):
            used = in_use(list(sha256s))
            for sha256 in sha256s:
                if sha256 in used:
                    continue
                if self.shared_db is not None:
                    chunks.remove(_db(self.shared_db), sha256)
                try:
                    self.path(sha256).unlink()
                except (FileNotFoundError, ValueError):
                    if self.shared_db is None:
                        continue
                removed.append(sha256)
        return removed


class _Hashing:
    def __init__(self, out, digest):
        self.out, self.digest = out, digest

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.out.write(data)


def _db(target):
    from .store.db import get_db
    return get_db(target)
