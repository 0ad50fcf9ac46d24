"""Package archives: formats, the content digest, and every hostile archive refused before
anything is written outside the target."""

import io
import os
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from dockyard.common.archive import (MAX_TAR_HEADER, ArchiveLimits, extract_archive,
                                     inspect_archive, pack_directory)
from dockyard.common.manifest import MAX_MANIFEST_BYTES
from dockyard.errors import BadPackage, TooLarge

MANIFEST = 'name = "pkg"\n'


def write_zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_tar(path: Path, build) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        build(tf)
    return path


def add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if data else None)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def package(tmp_path) -> Path:
    folder = tmp_path / "pkg"
    (folder / "lib").mkdir(parents=True)
    (folder / "dockyard.toml").write_text(MANIFEST)
    (folder / "main.py").write_text("def f(e):\n    return e\n")
    (folder / "lib" / "util.py").write_text("X = 1\n")
    (folder / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(folder / "run.sh", 0o755)
    return folder


def test_same_content_same_digest_whatever_the_format(tmp_path, package):
    packed = tmp_path / "a.zip"
    packed.write_bytes(pack_directory(package))
    assert pack_directory(package) == packed.read_bytes()  # deterministic
    tgz = write_tar(tmp_path / "a.tar.gz", lambda tf: tf.add(package, arcname="pkg"))
    a, b = inspect_archive(packed), inspect_archive(tgz)
    assert a.kind == "zip" and b.kind == "tar" and b.root_prefix == "pkg/"
    assert a.content_sha256 == b.content_sha256
    assert a.manifest_text == MANIFEST
    (package / "main.py").write_text("changed\n")
    c = tmp_path / "c.zip"
    c.write_bytes(pack_directory(package))
    assert inspect_archive(c).content_sha256 != a.content_sha256


def test_extract_strips_the_folder_and_keeps_exec_bits(tmp_path, package):
    tgz = write_tar(tmp_path / "a.tgz", lambda tf: tf.add(package, arcname="pkg"))
    dest = tmp_path / "out"
    extract_archive(tgz, dest)
    assert files_under(dest) == {"dockyard.toml", "main.py", "lib", "lib/util.py", "run.sh"}
    assert os.stat(dest / "run.sh").st_mode & 0o777 == 0o755
    assert os.stat(dest / "main.py").st_mode & 0o777 == 0o644


def test_pack_directory_skips_caches_and_needs_a_manifest(tmp_path, package):
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (package / "pkg.zip.deployed").write_text("1")
    z = tmp_path / "p.zip"
    z.write_bytes(pack_directory(package))
    assert sorted(zipfile.ZipFile(z).namelist()) == ["dockyard.toml", "lib/util.py", "main.py",
                                                     "run.sh"]
    with pytest.raises(BadPackage, match="has no dockyard.toml"):
        pack_directory(package / "lib")


def test_not_an_archive_and_no_manifest(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not a zip")
    with pytest.raises(BadPackage, match="not a zip or tar.gz archive"):
        inspect_archive(junk)
    no_manifest = write_zip(tmp_path / "n.zip", {"main.py": "x"})
    with pytest.raises(BadPackage, match="no dockyard.toml"):
        inspect_archive(no_manifest)
    two_tops = write_zip(tmp_path / "t.zip", {"a/dockyard.toml": MANIFEST, "b/x.py": ""})
    with pytest.raises(BadPackage, match="no dockyard.toml"):
        inspect_archive(two_tops)


@pytest.mark.parametrize("member, message", [
    ("../evil.py", "points outside the package"),
    ("a/../../evil.py", "points outside the package"),
    ("/etc/evil.py", "absolute path"),
    ("C:/evil.py", "absolute path"),
    ("a\\..\\evil.py", "forbidden character"),
])
def test_zip_slip_and_absolute_paths(tmp_path, member, message):
    z = write_zip(tmp_path / "bad.zip", {"dockyard.toml": MANIFEST, member: "pwned"})
    dest = tmp_path / "work" / "out"
    with pytest.raises(BadPackage, match=message):
        extract_archive(z, dest)
    assert not dest.exists()
    assert files_under(tmp_path) == {"bad.zip"}


def test_symlink_escape(tmp_path):
    def build(tf):
        add(tf, "dockyard.toml", MANIFEST.encode())
        add(tf, "link", type=tarfile.SYMTYPE, linkname="../../etc/passwd")
    tgz = write_tar(tmp_path / "s.tgz", build)
    with pytest.raises(BadPackage, match="link 'link' points outside"):
        extract_archive(tgz, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlink_inside_is_kept_and_nothing_is_written_through_it(tmp_path):
    def good(tf):
        add(tf, "dockyard.toml", MANIFEST.encode())
        add(tf, "real.py", b"X = 1\n")
        add(tf, "alias.py", type=tarfile.SYMTYPE, linkname="real.py")
    dest = tmp_path / "out"
    extract_archive(write_tar(tmp_path / "g.tgz", good), dest)
    assert os.readlink(dest / "alias.py") == "real.py"

    def through(tf):
        add(tf, "dockyard.toml", MANIFEST.encode())
        add(tf, "d", type=tarfile.SYMTYPE, linkname=".")
        add(tf, "d/x.py", b"x")
    with pytest.raises(BadPackage, match="written through a link"):
        extract_archive(write_tar(tmp_path / "t.tgz", through), tmp_path / "out2")


def test_hard_link_escape_and_device_files(tmp_path):
    def hard(tf):
        add(tf, "dockyard.toml", MANIFEST.encode())
        add(tf, "h", type=tarfile.LNKTYPE, linkname="../../etc/shadow")
    with pytest.raises(BadPackage, match="points outside"):
        extract_archive(write_tar(tmp_path / "h.tgz", hard), tmp_path / "o1")

    def dangling(tf):
        add(tf, "dockyard.toml", MANIFEST.encode())
        add(tf, "h", type=tarfile.LNKTYPE, linkname="missing.py")
    with pytest.raises(BadPackage, match="not a file of the package"):
        extract_archive(write_tar(tmp_path / "d.tgz", dangling), tmp_path / "o2")

    def inside(tf):
        add(tf, "dockyard.toml", MANIFEST.encode())
        add(tf, "a.py", b"A = 1\n")
        add(tf, "b.py", type=tarfile.LNKTYPE, linkname="a.py")
    extract_archive(write_tar(tmp_path / "i.tgz", inside), tmp_path / "o3")
    assert (tmp_path / "o3" / "b.py").read_text() == "A = 1\n"
    assert not (tmp_path / "o3" / "b.py").is_symlink()

    def device(tf):
        add(tf, "dockyard.toml", MANIFEST.encode())
        add(tf, "null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
    with pytest.raises(BadPackage, match="device"):
        extract_archive(write_tar(tmp_path / "v.tgz", device), tmp_path / "o4")
    assert not (tmp_path / "o4").exists()


def test_limits_from_the_directory(tmp_path):
    many = write_zip(tmp_path / "m.zip", {"dockyard.toml": MANIFEST,
                                          **{f"f{i}.py": "" for i in range(20)}})
    with pytest.raises(TooLarge, match="members"):
        inspect_archive(many, ArchiveLimits(max_members=10))
    big = write_zip(tmp_path / "b.zip", {"dockyard.toml": MANIFEST, "big": "x" * 5000})
    with pytest.raises(TooLarge, match="unpacks to"):
        inspect_archive(big, ArchiveLimits(max_uncompressed=1000))
    with pytest.raises(TooLarge, match="upload limit"):
        inspect_archive(big, ArchiveLimits(max_compressed=100))


def test_zip_bomb_with_default_limits_is_refused_without_unpacking(tmp_path):
    # 600 MB of zeros compress to ~600 KB; the central directory says so before any read.
    path = tmp_path / "bomb.zip"
    zeros = b"\0" * (1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dockyard.toml", MANIFEST)
        with zf.open("zeros.bin", "w", force_zip64=True) as member:
            for _ in range(600):
                member.write(zeros)
    assert path.stat().st_size < 5 * (1 << 20)
    with pytest.raises(TooLarge, match="unpacks to 600 MB"):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lying_size_in_a_zip_header(tmp_path):
    path = write_zip(tmp_path / "lie.zip", {"dockyard.toml": MANIFEST, "data": "y" * 4000})
    raw = bytearray(path.read_bytes())
    # Rewrite the central directory's uncompressed size of "data" to 10 bytes.
    cd = raw.rfind(b"PK\x01\x02")
    assert raw[cd + 46:cd + 50] == b"data"
    struct.pack_into("<I", raw, cd + 24, 10)
    path.write_bytes(bytes(raw))
    with pytest.raises(BadPackage):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- bounded parsing: the manifest's size, tar extended headers, names in messages ----------

def test_manifest_over_64_kb_is_refused_from_the_directory(tmp_path):
    big = 'name = "pkg"\n' + "#" * MAX_MANIFEST_BYTES + "\n"
    zipped = write_zip(tmp_path / "m.zip", {"dockyard.toml": big})
    with pytest.raises(BadPackage, match=f"dockyard.toml is {len(big)} bytes; the limit is "
                                         r"64 KB \(65536 bytes\)"):
        inspect_archive(zipped)
    tarred = write_tar(tmp_path / "m.tgz", lambda tf: add(tf, "pkg/dockyard.toml", big.encode()))
    with pytest.raises(BadPackage, match="the limit is 64 KB"):
        extract_archive(tarred, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # 200 000 parts of a dotted key: 400 KB of manifest in a ~1 KB archive.
    dotted = write_zip(tmp_path / "d.zip", {"dockyard.toml": "a" + ".a" * 200_000 + " = 1\n"})
    assert dotted.stat().st_size < 2048
    with pytest.raises(BadPackage, match="dockyard.toml is 400006 bytes; the limit is 64 KB"):
        inspect_archive(dotted)
    at_limit = 'name = "pkg"\n' + "#" * (MAX_MANIFEST_BYTES - 14) + "\n"
    assert len(at_limit) == MAX_MANIFEST_BYTES
    info = inspect_archive(write_zip(tmp_path / "ok.zip", {"dockyard.toml": at_limit}))
    assert info.manifest_text == at_limit


def test_manifest_larger_than_its_header_says_is_refused_while_reading(tmp_path):
    big = 'name = "pkg"\n' + "#" * (2 * MAX_MANIFEST_BYTES)
    path = write_zip(tmp_path / "lie.zip", {"dockyard.toml": big})
    raw = bytearray(path.read_bytes())
    cd = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<I", raw, cd + 24, 100)     # central directory: 100 bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(BadPackage):  # more than the header says, or then a bad CRC
        inspect_archive(path)


def pax_header(records: dict[str, str]) -> tuple[tarfile.TarInfo, bytes]:
    body = b""
    for key, value in records.items():
        item = f" {key}={value}\n".encode()
        n = len(item) + len(str(len(item)))
        n = len(item) + len(str(n))
        body += str(n).encode() + item
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(body)
    return info, body


def raw_tar(path: Path, blocks: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    import gzip
    out = io.BytesIO()
    for info, data in blocks:
        out.write(info.tobuf(tarfile.USTAR_FORMAT))
        out.write(data + b"\0" * (-len(data) % 512))
    out.write(b"\0" * 1024)
    path.write_bytes(gzip.compress(out.getvalue()))
    return path


def manifest_member() -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo("dockyard.toml")
    info.size = len(MANIFEST)
    return info, MANIFEST.encode()


def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path):
    # 20 MB of one pax record compress to ~20 KB; tarfile would read it whole into memory.
    header, body = pax_header({"path": "a" * (20 << 20)})
    path = raw_tar(tmp_path / "pax.tgz", [(header, body), manifest_member()])
    assert path.stat().st_size < 100_000
    with pytest.raises(BadPackage, match=f"extended tar header of {len(body)} bytes; the limit "
                                         f"is {MAX_TAR_HEADER // 1024} KB"):
        inspect_archive(path)


def test_a_huge_gnu_long_name_is_refused(tmp_path):
    name = b"a" * (1 << 20)
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = len(name) + 1
    path = raw_tar(tmp_path / "gnu.tgz", [(info, name + b"\0"), manifest_member()])
    with pytest.raises(BadPackage, match="extended tar header"):
        inspect_archive(path)


def test_a_chain_of_extended_headers_is_refused(tmp_path):
    # tarfile recurses once per extended header: thousands in a row were a RecursionError.
    header = pax_header({"comment": "x"})
    path = raw_tar(tmp_path / "chain.tgz", [header] * 5000 + [manifest_member()])
    with pytest.raises(BadPackage, match="more than 8 extended tar headers in a row"):
        inspect_archive(path)


def test_sparse_members_are_refused(tmp_path):
    info = tarfile.TarInfo("sparse.bin")
    info.type = tarfile.GNUTYPE_SPARSE
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    path = tmp_path / "sparse.tar"
    member, data = manifest_member()
    path.write_bytes(member.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)
                     + bytes(buf) + b"\0" * 1024)
    with pytest.raises(BadPackage, match="sparse"):
        inspect_archive(path)


def test_long_names_and_pax_headers_of_normal_size_still_work(tmp_path):
    long_name = "lib/" + "m" * 200 + "/" + "n" * 200 + ".py"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"long-{fmt}.tgz"
        with tarfile.open(path, "w:gz", format=fmt) as tf:
            add(tf, "dockyard.toml", MANIFEST.encode())
            add(tf, long_name, b"X = 1\n")
        out = tmp_path / f"out-{fmt}"
        extract_archive(path, out)
        assert (out / long_name).read_text() == "X = 1\n"


def test_member_names_in_messages_are_cut_short(tmp_path):
    long_name = "../" + "n" * 60_000
    path = write_zip(tmp_path / "n.zip", {"dockyard.toml": MANIFEST, long_name: "x"})
    with pytest.raises(BadPackage) as info:
        inspect_archive(path)
    assert "points outside" in info.value.message and len(info.value.message) < 200
    header, body = pax_header({"path": "/" + "p" * 60_000})
    path = raw_tar(tmp_path / "abs.tgz", [manifest_member(), (header, body),
                                          (tarfile.TarInfo("x"), b"")])
    with pytest.raises(BadPackage) as info:
        inspect_archive(path)
    assert "absolute path" in info.value.message and len(info.value.message) < 200


def test_a_zip_symlink_target_is_read_only_up_to_4_kb(tmp_path):
    import tracemalloc
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dockyard.toml", MANIFEST)
        link = zipfile.ZipInfo("link")
        link.external_attr = 0o120777 << 16
        link.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(link, "../" + "a" * (64 << 20))   # 64 MB of target
    tracemalloc.start()
    try:
        with pytest.raises(BadPackage) as info:
            inspect_archive(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "points outside" in info.value.message and len(info.value.message) < 250
    assert peak < 8 << 20


def _many_members(path: Path, count: int) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dockyard.toml", 'name = "many"\n')
        for i in range(count):
            zf.writestr(f"f{i}", b"")
    return path


def _never_parsed(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the central directory was parsed")
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", refuse)


def test_too_many_zip_members_are_refused_before_the_directory_is_parsed(tmp_path,
                                                                          monkeypatch):
    """zipfile makes an object per member while it opens an archive: a million empty members
    in 100 MB cost seconds and hundreds of MB before a count could be checked. The end
    record's count is checked first."""
    path = _many_members(tmp_path / "many.zip", 500)
    _never_parsed(monkeypatch)
    with pytest.raises(TooLarge, match="501 members; the limit is 100"):
        inspect_archive(path, ArchiveLimits(max_members=100))


def test_a_zip_whose_end_record_understates_its_members_is_still_refused_unparsed(
        tmp_path, monkeypatch):
    """The count in the end record can lie (zipfile reads the directory by its size): the
    directory's headers are counted before zipfile parses them."""
    path = _many_members(tmp_path / "liar.zip", 500)
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, end + 8, 1, 1)   # "1 member" on this disk and in all
    path.write_bytes(bytes(data))
    _never_parsed(monkeypatch)
    with pytest.raises(TooLarge, match=r"more than 10 members \(its end record says 1\)"):
        inspect_archive(path, ArchiveLimits(max_members=10))
