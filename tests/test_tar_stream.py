"""The loader's own tar stream parser (pipeline/shards/reader.py) against tarfile, on every tar form a
shard from elsewhere may take, and on hostile ones."""

from __future__ import annotations

import io
import tarfile
import time

import pytest
import webdataset as wds

from pipeline.shards.metadata import BadMetadata
from pipeline.shards.reader import iter_tar

MEMBERS = [
    ("00000001.jpg", b"\xff\xd8" + bytes(range(256)) * 40),
    ("00000001.json", b'{"text": ["a"]}'),
    ("d" * 150 + "/" + "e" * 120 + ".jpg", b"y" * 513),  # longer than ustar's 100 characters
    ("\u00e9t\u00e9/caf\u00e9.json", b""),  # non-ASCII, empty
    ("00000002.jpg", b"z" * 1024),  # exactly two blocks: no padding
]


def _tar(members, fmt=tarfile.PAX_FORMAT, extra=None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), time.time()  # a float mtime: PAX_FORMAT writes a pax header for it
            tar.addfile(info, io.BytesIO(data))
        if extra:
            extra(tar)
    return out.getvalue()


def _stream(data: bytes, chunk: int = 7):
    """A stream that returns short reads, as a socket does."""
    class Short(io.RawIOBase):
        def __init__(self):
            self.data, self.pos = data, 0

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), chunk, len(self.data) - self.pos)
            b[:n] = self.data[self.pos:self.pos + n]
            self.pos += n
            return n

    return Short()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_every_tar_format_reads_as_tarfile_reads_it(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 100 and m[0].isascii()]
    data = _tar(members, fmt)
    assert list(iter_tar(_stream(data), "t.tar")) == members
    assert list(iter_tar(io.BufferedReader(io.BytesIO(data)), "t.tar")) == members
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the reference
        assert [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()] == members


def test_webdataset_tars_with_pax_headers_read():
    out = io.BytesIO()
    with wds.TarWriter(out) as writer:
        writer.write({"__key__": "k1", "jpg": b"abc", "json": b"{}"})
        writer.write({"__key__": "k2", "jpg": b"defg", "json": b"[]"})
    assert list(iter_tar(io.BytesIO(out.getvalue()), "w.tar")) == [("k1.jpg", b"abc"), ("k1.json", b"{}"), ("k2.jpg", b"defg"),
                                                                    ("k2.json", b"[]")]


def test_select_and_directories():
    def add_dir(tar):
        info = tarfile.TarInfo("folder")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)

    data = _tar(MEMBERS[:2], extra=add_dir)
    assert [n for n, _ in iter_tar(io.BytesIO(data), "t.tar")] == ["00000001.jpg", "00000001.json"]
    assert list(iter_tar(io.BytesIO(data), "t.tar", select=lambda n: n.endswith(".json"))) == [MEMBERS[1]]


@pytest.mark.parametrize("kind, message", [
    (tarfile.SYMTYPE, r"'evil\.jpg' is a symlink -> \.\./\.\./etc/passwd; refused"),
    (tarfile.LNKTYPE, r"'evil\.jpg' is a hard link"),
    (tarfile.CHRTYPE, r"'evil\.jpg' is not a regular file"),
    (tarfile.GNUTYPE_SPARSE, r"'evil\.jpg' is a sparse file; refused"),
])
def test_links_devices_and_sparse_members_are_refused(kind, message):
    def add(tar):
        info = tarfile.TarInfo("evil.jpg")
        info.type, info.linkname = kind, "../../etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        tar.addfile(info)

    with pytest.raises(BadMetadata, match=r"^t\.tar: tar member " + message):
        list(iter_tar(io.BytesIO(_tar(MEMBERS[:1], tarfile.GNU_FORMAT, add)), "t.tar"))


def test_unsafe_names_from_pax_headers_are_refused():
    data = _tar([("../outside.jpg", b"x")])  # the '..' name
    with pytest.raises(BadMetadata, match=r"'\.\./outside\.jpg' has an absolute or '\.\.' name"):
        list(iter_tar(io.BytesIO(data), "t.tar"))


def test_cut_short_tars():
    data = _tar(MEMBERS, tarfile.GNU_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    # Cut where a member starts: a clean end (the loader's count check against sizes.json then speaks).
    assert [n for n, _ in iter_tar(io.BytesIO(data[:offsets[2]]), "t.tar")] == ["00000001.jpg", "00000001.json"]
    with pytest.raises(BadMetadata, match="ends inside member '00000001.jpg'"):
        list(iter_tar(io.BytesIO(data[:offsets[0] + 512 + 100]), "t.tar"))
    with pytest.raises(BadMetadata, match="ends inside a header"):
        list(iter_tar(io.BytesIO(data[:offsets[1] + 100]), "t.tar"))


def test_malformed_and_oversized_extended_headers_are_refused():
    def pax_member(records: bytes) -> bytes:
        info = tarfile.TarInfo("././@PaxHeader")
        info.type, info.size = tarfile.XHDTYPE, len(records)
        return info.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)

    body = _tar(MEMBERS[:1], tarfile.USTAR_FORMAT)
    with pytest.raises(BadMetadata, match="malformed pax header"):
        list(iter_tar(io.BytesIO(pax_member(b"99 path=x\n") + body), "t.tar"))
    with pytest.raises(BadMetadata, match="pax size 'lots'"):
        list(iter_tar(io.BytesIO(pax_member(b"13 size=lots\n") + body), "t.tar"))
    huge = tarfile.TarInfo("././@PaxHeader")
    huge.type, huge.size = tarfile.XHDTYPE, 64 << 20
    with pytest.raises(BadMetadata, match="extended header of 67108864 bytes; refused"):
        list(iter_tar(io.BytesIO(huge.tobuf(tarfile.USTAR_FORMAT)), "t.tar"))
    with pytest.raises(BadMetadata, match="not a readable tar"):
        list(iter_tar(io.BytesIO(b"not a tar at all" * 64), "t.tar"))
