"""The data dir layout: the database, content-addressed artifacts and the access tokens."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

TOKEN_KINDS = ("admin", "worker", "invoke")


@dataclass(frozen=True)
class DataDir:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike | None) -> "DataDir":
        path = path or os.environ.get("DOCKYARD_HOME") or ".dockyard"
        return cls(Path(path).absolute())

    @cached_property
    def db_path(self) -> Path:
        # Looked up on every request: computed once.
        return self.root / "dockyard.db"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def worker(self) -> Path:
        return self.root / "worker"

    @property
    def server_json(self) -> Path:
        return self.root / "server.json"

    def token_path(self, kind: str) -> Path:
        return self.tokens / kind

    def ensure(self) -> None:
        """Create the layout and the tokens (first start). The root is traversable but not
        listable, so sandboxed children can reach their own code below worker/ and nothing
        else; everything secret is 0700/0600."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        for private in (self.tokens, self.artifacts, self.uploads):
            private.mkdir(exist_ok=True)
            os.chmod(private, 0o700)
        for kind in TOKEN_KINDS:
            path = self.token_path(kind)
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f"dy{kind[0]}_" + secrets.token_urlsafe(32) + "\n")
            os.chmod(path, 0o600)
        if self.db_path.exists():
            os.chmod(self.db_path, 0o600)

    def read_token(self, kind: str) -> str | None:
        try:
            return self.token_path(kind).read_text().strip() or None
        except OSError:
            return None
