"""Content-addressed store of uploaded packages: `artifacts/<sha256>`."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import IO

from ..errors import TooLarge

CHUNK = 1 << 20
PREFIX = "upload-"
# A temp upload untouched this long belongs to a request whose process died (a request that
# fails removes its own): the next upload removes it.
STALE_UPLOAD_S = 3600


class ArtifactStore:
    def __init__(self, root: Path, uploads: Path):
        self.root = root
        self.uploads = uploads

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256")
        return self.root / sha256

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
        if final.exists():
            tmp.unlink(missing_ok=True)
        else:
            os.chmod(tmp, 0o600)
            os.replace(tmp, final)
        return final
