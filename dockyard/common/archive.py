"""Package archives, safe by construction: format by magic bytes, sizes and member count from
the archive's directory before any data is read, no member or link may leave the package, and
a content digest that does not depend on how the files were packed."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import stat
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadPackage, TooLarge
from .manifest import MAX_MANIFEST_BYTES, clipped, quoted

MANIFEST = "dockyard.toml"
SKIP_DIRS = {"__pycache__", ".git", ".venv", ".hg", ".svn"}
SKIP_SUFFIXES = (".pyc", ".deployed", ".failed", ".deploying")
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
CHUNK = 1 << 16
MAX_TAR_HEADER = 64 * 1024        # one pax or GNU long-name header
MAX_TAR_HEADERS_IN_A_ROW = 8      # extended headers before one member (tarfile recurses)
# A central-directory header: its signature, then (after fixed fields) the lengths of the
# name, the extra field and the comment that follow it.
ZIP_HEADER = struct.Struct("<4s24xHHH12x")


@dataclass(frozen=True)
class ArchiveLimits:
    max_compressed: int = 100 * 1024 * 1024
    max_uncompressed: int = 500 * 1024 * 1024
    max_members: int = 10_000
    max_manifest: int = MAX_MANIFEST_BYTES


@dataclass(frozen=True)
class PackageInfo:
    kind: str
    root_prefix: str
    manifest_text: str
    content_sha256: str
    total_size: int
    member_count: int
    # The package's own importable modules ("main", "pkg", "pkg.sub"): what a call may name
    # as "module:callable" besides the declared functions.
    modules: frozenset = frozenset()


@dataclass
class _Entry:
    name: str            # normalized path inside the archive
    kind: str            # file | dir | symlink | hardlink
    size: int
    executable: bool
    target: str = ""     # link target
    ref: object = None   # ZipInfo / TarInfo


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.0f} MB"


def _normalize(name: str) -> str:
    if "\x00" in name or "\\" in name:
        raise BadPackage(f"archive member {quoted(name)} has a forbidden character")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BadPackage(f"archive member {quoted(name)} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadPackage(f"archive member {quoted(name)} points outside the package ('..')")
    return "/".join(parts)


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header whole into memory, whatever size it
    declares, and recurses once per extended header: both are bounded here before anything
    is read. Sparse members (whose maps tarfile also reads unbounded) are refused."""

    def _extended(self, tf, read):
        if self.size > MAX_TAR_HEADER:
            raise BadPackage(f"the archive has an extended tar header of {self.size} bytes; "
                             f"the limit is {MAX_TAR_HEADER // 1024} KB")
        depth = getattr(tf, "_dockyard_header_depth", 0)
        if depth >= MAX_TAR_HEADERS_IN_A_ROW:
            raise BadPackage(f"the archive has more than {MAX_TAR_HEADERS_IN_A_ROW} extended "
                             "tar headers in a row")
        tf._dockyard_header_depth = depth + 1
        try:
            return read(tf)
        finally:
            tf._dockyard_header_depth = depth

    def _proc_pax(self, tf):
        return self._extended(tf, super()._proc_pax)

    def _proc_gnulong(self, tf):
        return self._extended(tf, super()._proc_gnulong)

    def _sparse(self, *args):
        raise BadPackage("the archive has a sparse file; pack the package without --sparse")

    _proc_sparse = _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _sparse


def _open_tar(path: Path) -> tarfile.TarFile:
    return tarfile.open(path, "r:*", tarinfo=_BoundedTarInfo)


def _detect(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(512 + 8)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return "tar"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise BadPackage("not a zip or tar.gz archive: upload a .zip, .tar.gz or .tgz "
                     "(or deploy a folder with the CLI)")


def _check_zip_directory(path: Path, limits: ArchiveLimits) -> None:
    """Refuse a zip with too many members before zipfile parses its central directory:
    zipfile builds an object per member, so a 100 MB archive of a million empty members would
    cost seconds and hundreds of MB before the member count could be checked. The end record
    states the count, but zipfile reads the directory by its size and the count can lie: the
    directory's headers are counted here (a walk over fixed-size fields, nothing kept), up to
    one past the limit."""
    with open(path, "rb") as f:
        end = zipfile._EndRecData(f)  # the end-of-central-directory record, zip64 included
        if end is None:
            raise BadPackage("the archive is damaged: no end of central directory record")
        count = end[zipfile._ECD_ENTRIES_TOTAL]
        if count > limits.max_members:
            raise TooLarge(f"archive has {count} members; the limit is {limits.max_members}")
        size, offset = end[zipfile._ECD_SIZE], end[zipfile._ECD_OFFSET]
        # Where the directory really starts (as zipfile finds it: data may precede the zip).
        start = end[zipfile._ECD_LOCATION] - size
        if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
            start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
        if start < 0 or offset < 0:
            return   # zipfile says what is wrong
        f.seek(start)
        directory = f.read(size)
    headers, position = 0, 0
    while position + ZIP_HEADER.size <= len(directory):
        fields = ZIP_HEADER.unpack_from(directory, position)
        if fields[0] != zipfile.stringCentralDir:
            break
        headers += 1
        if headers > limits.max_members:
            raise TooLarge(f"archive has more than {limits.max_members} members (its end "
                           f"record says {count})")
        position += ZIP_HEADER.size + fields[1] + fields[2] + fields[3]


def _zip_entries(zf: zipfile.ZipFile, limits: ArchiveLimits) -> list[_Entry]:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise TooLarge(f"archive has {len(infos)} members; the limit is {limits.max_members}")
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_uncompressed:
        raise TooLarge(f"archive unpacks to {_mb(declared)}; the limit is "
                       f"{_mb(limits.max_uncompressed)}")
    entries = []
    for info in infos:
        mode = (info.external_attr >> 16) & 0xFFFF
        name = _normalize(info.filename)
        if not name:
            continue
        if info.is_dir():
            entries.append(_Entry(name, "dir", 0, False, ref=info))
        elif stat.S_ISLNK(mode):
            with zf.open(info) as stream:
                target = stream.read(4096).decode("utf-8", "replace")
            entries.append(_Entry(name, "symlink", 0, False, target, info))
        elif mode and not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            raise BadPackage(f"archive member {quoted(name)} is not a regular file")
        else:
            entries.append(_Entry(name, "file", info.file_size, bool(mode & 0o111), ref=info))
    return entries


def _tar_entries(tf: tarfile.TarFile, limits: ArchiveLimits) -> list[_Entry]:
    entries, total = [], 0
    # Iterate instead of getmembers(): a bomb is refused before it is all decompressed.
    for info in tf:
        if len(entries) >= limits.max_members:
            raise TooLarge(f"archive has more than {limits.max_members} members")
        name = _normalize(info.name)
        total += max(info.size, 0)
        if total > limits.max_uncompressed:
            raise TooLarge(f"archive unpacks to more than {_mb(limits.max_uncompressed)}")
        if not name:
            continue
        if info.isdir():
            entries.append(_Entry(name, "dir", 0, False, ref=info))
        elif info.isreg():
            entries.append(_Entry(name, "file", info.size, bool(info.mode & 0o111), ref=info))
        elif info.issym():
            entries.append(_Entry(name, "symlink", 0, False, info.linkname, info))
        elif info.islnk():
            entries.append(_Entry(name, "hardlink", 0, False, info.linkname, info))
        else:
            raise BadPackage(f"archive member {quoted(name)} is a device, fifo or other special "
                             "file")
    return entries


def _find_root(entries: list[_Entry]) -> str:
    names = {e.name for e in entries}
    if MANIFEST in names:
        return ""
    tops = {e.name.split("/", 1)[0] for e in entries}
    if len(tops) == 1:
        top = tops.pop()
        if f"{top}/{MANIFEST}" in names:
            return top + "/"
    raise BadPackage(f"no {MANIFEST} at the archive root (or inside its single top-level "
                     "folder)")


def _check_links(entries: list[_Entry], prefix: str) -> list[_Entry]:
    """Strip the prefix and make sure no link leaves the package and nothing is written
    through a link."""
    by_name: dict[str, _Entry] = {}
    out = []
    for e in entries:
        if prefix and not (e.name + "/").startswith(prefix):
            raise BadPackage(f"archive member {quoted(e.name)} is outside the package folder")
        rel = e.name[len(prefix):]
        if not rel:
            continue
        e = _Entry(rel, e.kind, e.size, e.executable, e.target, e.ref)
        if e.kind in ("symlink", "hardlink"):
            target = e.target
            if target.startswith("/") or "\\" in target:
                raise BadPackage(f"link {quoted(rel)} points outside the package "
                                 f"({quoted(target)})")
            if e.kind == "symlink":
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
            else:
                resolved = posixpath.normpath(target[len(prefix):] if target.startswith(prefix)
                                              else target)
            if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
                raise BadPackage(f"link {quoted(rel)} points outside the package "
                                 f"({quoted(target)})")
            if e.kind == "hardlink":
                source = by_name.get(resolved)
                if source is None or source.kind != "file":
                    raise BadPackage(f"hard link {quoted(rel)} points to {quoted(target)}, "
                                     "which is not a file of the package")
                e.target = resolved
        by_name[rel] = e
        out.append(e)
    links = {e.name for e in out if e.kind == "symlink"}
    for e in out:
        parts = e.name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise BadPackage(f"archive member {quoted(e.name)} would be written through a "
                                 "link")
    return out


class _Reader:
    """Reads member data with the real byte count checked against the limits."""

    def __init__(self, path: Path, kind: str, limits: ArchiveLimits):
        self.kind = kind
        self.limits = limits
        self.total = 0
        self.handle = zipfile.ZipFile(path) if kind == "zip" else _open_tar(path)

    def chunks(self, entry: _Entry):
        if self.kind == "zip":
            stream = self.handle.open(entry.ref)
        else:
            stream = self.handle.extractfile(entry.ref)
        seen = 0
        with stream:
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                seen += len(chunk)
                self.total += len(chunk)
                if seen > entry.size:
                    raise BadPackage(f"archive member {quoted(entry.name)} is larger than its "
                                     "header says")
                if self.total > self.limits.max_uncompressed:
                    raise TooLarge(f"archive unpacks to more than "
                                   f"{_mb(self.limits.max_uncompressed)}")
                yield chunk

    def close(self) -> None:
        self.handle.close()


def _open(path: Path, limits: ArchiveLimits):
    size = os.path.getsize(path)
    if size > limits.max_compressed:
        raise TooLarge(f"package is {_mb(size)}; the upload limit is {_mb(limits.max_compressed)}")
    kind = _detect(path)
    try:
        if kind == "zip":
            _check_zip_directory(path, limits)
            with zipfile.ZipFile(path) as zf:
                entries = _zip_entries(zf, limits)
        else:
            with _open_tar(path) as tf:
                entries = _tar_entries(tf, limits)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, RecursionError,
            zlib_error()) as exc:
        raise BadPackage(f"the archive is damaged: {_damage(exc)}") from None
    prefix = _find_root(entries)
    for e in entries:
        if e.name == prefix + MANIFEST and e.size > limits.max_manifest:
            raise BadPackage(f"{MANIFEST} is {e.size} bytes; the limit is "
                             f"{_kb(limits.max_manifest)}")
    return kind, prefix, _check_links(entries, prefix)


def _kb(n: int) -> str:
    return f"{n // 1024} KB ({n} bytes)"


def _damage(exc: BaseException) -> str:
    return clipped(str(exc) or type(exc).__name__)


def _walk(path: Path, limits: ArchiveLimits, sink=None) -> PackageInfo:
    kind, prefix, entries = _open(path, limits)
    reader = _Reader(path, kind, limits)
    lines, manifest, total = [], None, 0
    file_hashes: dict[str, str] = {}
    try:
        for e in sorted(entries, key=lambda x: x.name):
            if e.kind == "file":
                digest = hashlib.sha256()
                data = io.BytesIO() if e.name == MANIFEST else None
                for chunk in reader.chunks(e):
                    digest.update(chunk)
                    if data is not None:
                        data.write(chunk)
                        if data.tell() > limits.max_manifest:
                            raise BadPackage(f"{MANIFEST} is larger than the limit of "
                                             f"{_kb(limits.max_manifest)}")
                    if sink:
                        sink.write(e, chunk)
                if sink:
                    sink.close_file(e)
                file_hashes[e.name] = digest.hexdigest()
                total += e.size
                lines.append(f"{e.name}\0{'x' if e.executable else '-'}\0{digest.hexdigest()}")
                if data is not None:
                    manifest = data.getvalue()
            elif e.kind == "symlink":
                lines.append(f"{e.name}\0L\0{e.target}")
        for e in entries:
            if e.kind == "hardlink":
                lines.append(f"{e.name}\0-\0{file_hashes[e.target]}")
                if sink:
                    sink.copy(e)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib_error()) as exc:
        raise BadPackage(f"the archive is damaged: {_damage(exc)}") from None
    finally:
        reader.close()
    if sink:
        sink.finish([e for e in entries if e.kind in ("dir", "symlink")])
    try:
        manifest_text = (manifest or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise BadPackage(f"{MANIFEST} is not UTF-8 text") from None
    content = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    modules = package_modules(e.name for e in entries if e.kind in ("file", "hardlink"))
    return PackageInfo(kind, prefix, manifest_text, content, total, len(entries), modules)


def package_modules(files) -> frozenset:
    """The dotted module names of the package's own `.py` files (`pkg/__init__.py` is
    `pkg`); a path with a part that is not an identifier cannot be imported by name."""
    found = set()
    for name in files:
        if not name.endswith(".py"):
            continue
        parts = name[:-3].split("/")
        if parts[-1] == "__init__":
            parts.pop()
        if parts and all(part.isidentifier() for part in parts):
            found.add(".".join(parts))
    return frozenset(found)


def zlib_error():
    import zlib
    return zlib.error


def inspect_archive(path, limits: ArchiveLimits = ArchiveLimits()) -> PackageInfo:
    return _walk(Path(path), limits)


class _Extractor:
    def __init__(self, dest: Path):
        self.dest = dest
        self.fds: dict[str, int] = {}

    def _dirs(self, rel: str) -> None:
        parent = self.dest.joinpath(*rel.split("/")[:-1])
        parent.mkdir(parents=True, exist_ok=True)

    def write(self, entry: _Entry, chunk: bytes) -> None:
        fd = self.fds.get(entry.name)
        if fd is None:
            self._dirs(entry.name)
            fd = os.open(self.dest / entry.name,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            self.fds[entry.name] = fd
        os.write(fd, chunk)

    def close_file(self, entry: _Entry) -> None:
        fd = self.fds.pop(entry.name, None)
        if fd is None:  # an empty file
            self._dirs(entry.name)
            fd = os.open(self.dest / entry.name,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        os.chmod(self.dest / entry.name, 0o755 if entry.executable else 0o644)

    def copy(self, entry: _Entry) -> None:
        self._dirs(entry.name)
        shutil.copyfile(self.dest / entry.target, self.dest / entry.name, follow_symlinks=False)
        os.chmod(self.dest / entry.name, 0o644)

    def finish(self, entries: list[_Entry]) -> None:
        # Symlinks last, so nothing is ever written through one.
        for e in entries:
            if e.kind == "dir":
                (self.dest / e.name).mkdir(parents=True, exist_ok=True)
        for e in entries:
            if e.kind == "symlink":
                self._dirs(e.name)
                os.symlink(e.target, self.dest / e.name)


def extract_archive(path, dest, limits: ArchiveLimits = ArchiveLimits()) -> PackageInfo:
    """Validate, then extract into `dest` (created; must be empty) without the root prefix."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    inspect_archive(path, limits)  # refuse before writing anything
    dest.mkdir(parents=True, exist_ok=True)
    extractor = _Extractor(dest)
    try:
        return _walk(Path(path), limits, extractor)
    except BaseException:
        for fd in extractor.fds.values():
            os.close(fd)
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _skipped(rel: Path) -> bool:
    return any(p in SKIP_DIRS for p in rel.parts) or rel.name.endswith(SKIP_SUFFIXES)


def pack_directory(src) -> bytes:
    """A deterministic zip of a package folder (same files → same bytes)."""
    src = Path(src)
    if not (src / MANIFEST).is_file():
        raise BadPackage(f"{src} has no {MANIFEST}; create one (dockyard init NAME makes a "
                         "template)")
    buf = io.BytesIO()
    root = src.resolve()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in sorted(filenames):
                path = Path(dirpath) / name
                rel = path.relative_to(src)
                if _skipped(rel):
                    continue
                info = zipfile.ZipInfo(rel.as_posix(), ZIP_EPOCH)
                if path.is_symlink():
                    target = os.readlink(path)
                    resolved = (path.parent / target).resolve()
                    if os.path.isabs(target) or not resolved.is_relative_to(root):
                        raise BadPackage(f"{rel} links outside the package ({target})")
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                    zf.writestr(info, target)
                    continue
                executable = os.stat(path).st_mode & 0o111
                info.external_attr = (stat.S_IFREG | (0o755 if executable else 0o644)) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def read_package(path) -> bytes:
    path = Path(path)
    if path.is_dir():
        return pack_directory(path)
    return path.read_bytes()
