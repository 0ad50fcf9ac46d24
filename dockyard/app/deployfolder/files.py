"""What the deploy folder holds: which names are packages and which are marker files, which
changes are noise (editor temp files, dotfiles, __pycache__), and whether an archive has
finished arriving."""

from __future__ import annotations

import enum
import gzip
import os
import zipfile
import zlib
from pathlib import Path

from ...common.archive import MANIFEST, inspect_archive
from ...common.manifest import parse_manifest

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
# What editors and downloaders leave beside the file they work on.
TEMP_SUFFIXES = ("~", ".swp", ".swo", ".swx", ".swpx", ".tmp", ".part", ".crdownload", ".pyc")
TEMP_NAMES = ("4913",)  # vim's probe that a folder is writable
ZIP_END_RECORD = b"PK\x05\x06"
ZIP_END_RECORD_SIZE = 22
ZIP_MAX_COMMENT = 0xFFFF


class Kind(str, enum.Enum):
    ARCHIVE = "archive"
    FOLDER = "folder"

    def __str__(self) -> str:
        return self.value


class Marker(str, enum.Enum):
    """The files written beside a package (WildFly's deployment-scanner markers), and the one
    a user writes to make the watcher leave a package alone."""

    PENDING = ".pending"
    DEPLOYING = ".deploying"
    DEPLOYED = ".deployed"
    FAILED = ".failed"
    UNDEPLOYED = ".undeployed"
    SKIPDEPLOY = ".skipdeploy"

    def __str__(self) -> str:
        return self.value


OUTCOMES = (Marker.PENDING, Marker.DEPLOYING, Marker.DEPLOYED, Marker.FAILED, Marker.UNDEPLOYED)


def is_noise(name: str) -> bool:
    """A name whose changes never mean a package changed."""
    return (name.startswith(".") or name == "__pycache__" or name in TEMP_NAMES
            or name.endswith(TEMP_SUFFIXES) or (name.startswith("#") and name.endswith("#")))


def split_marker(name: str) -> tuple[str, Marker] | None:
    """`hello.zip.deployed` → ("hello.zip", DEPLOYED); None for a name that is no marker."""
    for marker in Marker:
        if name.endswith(marker.value) and len(name) > len(marker.value):
            return name[:-len(marker.value)], marker
    return None


def entry_of(folder: Path, path: str | os.PathLike) -> tuple[str, Marker | None] | None:
    """Which entry of the folder a changed path belongs to, and the marker it is, if any.
    None for the folder itself, for paths outside it and for noise."""
    try:
        parts = Path(path).relative_to(folder).parts
    except ValueError:
        return None
    if not parts or any(is_noise(part) for part in parts):
        return None
    if len(parts) == 1:
        marker = split_marker(parts[0])
        if marker is not None:
            return marker
    return parts[0], None


def kind_of(path: Path) -> Kind | None:
    """An archive by its name, or a folder holding dockyard.toml; anything else is ignored."""
    if is_noise(path.name) or split_marker(path.name) is not None:
        return None
    if path.is_dir():
        return Kind.FOLDER if (path / MANIFEST).is_file() else None
    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
        return Kind.ARCHIVE
    return None


def packages_in(folder: Path) -> set[str]:
    """The names of the packages in the folder now (archives, and folders with a manifest)."""
    return {found[0] for child in folder.iterdir()
            if (found := entry_of(folder, child)) and kind_of(folder / found[0]) is not None}


def signature(path: Path, kind: Kind) -> tuple:
    """Size and mtime of an archive, or of every file of a folder that is not noise: equal
    signatures over a settle window mean nobody is writing."""
    if kind is Kind.ARCHIVE:
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not is_noise(d))
        for name in sorted(filenames):
            if is_noise(name):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            files.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(files)


def incomplete_reason(path: Path, kind: Kind) -> str | None:
    """Why an archive is not whole yet (None once it is): a zip whose end-of-directory record
    is not there, a gzip stream that has not ended. An archive that is damaged in any other
    way counts as whole: the upload says what is wrong with it."""
    if kind is Kind.FOLDER:
        return None
    size = path.stat().st_size
    if size == 0:
        return "the file is still empty"
    with open(path, "rb") as f:
        head = f.read(4)
        if path.name.endswith(".zip"):
            if not head.startswith(b"PK"):
                return None
            tail_start = max(0, size - ZIP_END_RECORD_SIZE - ZIP_MAX_COMMENT)
            f.seek(tail_start)
            tail = f.read()
    if path.name.endswith(".zip"):
        return None if _zip_has_end(tail, tail_start, size) else \
            "the zip has no central directory yet (still being copied?)"
    if not head.startswith(b"\x1f\x8b"):
        return None
    try:
        with gzip.open(path) as stream:
            while stream.read(1 << 20):
                pass
    except EOFError:
        return "the gzip stream has not ended yet (still being copied?)"
    except (OSError, zlib.error):
        return None
    return None


def unopened_reason(path: Path) -> str:
    """Why an archive that is not whole does not open, in the archive reader's words, for an
    archive that has stopped changing: `not a zip archive: File is not a zip file`."""
    is_zip = path.name.endswith(".zip")
    try:
        if is_zip:
            with zipfile.ZipFile(path):
                pass
            # zipfile finds an end record that does not reach the end of the file.
            words = "bytes after its end of central directory"
        else:
            with gzip.open(path) as stream:
                while stream.read(1 << 20):
                    pass
            words = "the gzip stream does not end"
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
        words = str(exc) or type(exc).__name__
    return f"not a {'zip' if is_zip else 'tar.gz'} archive: {words[:200]}"


def _zip_has_end(tail: bytes, tail_start: int, size: int) -> bool:
    """The end-of-central-directory record, whose comment reaches exactly to the end of the
    file (as zipfile checks it); a half-copied zip has none."""
    at = tail.rfind(ZIP_END_RECORD)
    while at >= 0:
        if len(tail) - at >= ZIP_END_RECORD_SIZE:
            comment = int.from_bytes(tail[at + 20:at + 22], "little")
            if tail_start + at + ZIP_END_RECORD_SIZE + comment == size:
                return True
        at = tail.rfind(ZIP_END_RECORD, 0, at)
    return False


def container_name(path: Path, kind: Kind) -> str | None:
    """The name a package declares, read here only to find collisions; None when it cannot
    be read (the upload then says why, in the API's words)."""
    try:
        if kind is Kind.FOLDER:
            text = (path / MANIFEST).read_text()
        else:
            text = inspect_archive(path).manifest_text
        return parse_manifest(text).name
    except Exception:  # noqa: BLE001 - any failure is the upload's to explain
        return None


def marker_path(folder: Path, name: str, marker: Marker) -> Path:
    return folder / f"{name}{marker.value}"


def write_marker(folder: Path, name: str, marker: Marker, text: str,
                 replace_others: bool = True) -> None:
    """Write one marker (one line), by default replacing every other outcome marker of the
    entry: a marker from an earlier attempt never stays beside a newer one. Written through
    a dotfile and a rename, so nobody reads half a line."""
    if replace_others:
        for other in OUTCOMES:
            if other is not marker:
                marker_path(folder, name, other).unlink(missing_ok=True)
    target = marker_path(folder, name, marker)
    temp = folder / f".{target.name}.{os.getpid()}.tmp"
    temp.write_text(text.replace("\n", " ").strip() + "\n")
    os.replace(temp, target)


def read_marker(folder: Path, name: str, marker: Marker) -> str | None:
    try:
        return marker_path(folder, name, marker).read_text().strip()
    except OSError:
        return None


def clear_markers(folder: Path, name: str, *markers: Marker) -> None:
    for marker in markers or OUTCOMES:
        marker_path(folder, name, marker).unlink(missing_ok=True)


def folder_problem(folder: Path) -> str | None:
    """Why the folder cannot be watched, in a few words, or None."""
    if not folder.exists():
        return "does not exist"
    if not folder.is_dir():
        return "is not a folder"
    if not os.access(folder, os.R_OK | os.X_OK):
        return "cannot be read (permission denied)"
    return None
