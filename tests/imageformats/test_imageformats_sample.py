"""Format code against the committed sample (tests/data/legacy) -- no root needed.

The sample was made by the real partimage 0.6.9 (see make_sample.sh); its JSON
records the sha256 of what ``partimage restore`` wrote onto a zero-filled
device.  These tests hold our reader, the partclone writer and the converter
to that reference with pure-Python restores; test_imageformats_tools.py does
the same with the real tools.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import shutil
import zlib
from pathlib import Path

import pytest
from pi_helpers import DATA, PARTIMAGE_GROUP, sha256_file, zero_file

from imgfarm.errors import ImageError
from imgfarm.imageformats import (
    convert_legacy,
    inspect,
    read_manifest,
    validate_manifest,
    verify_image,
    write_manifest,
)
from imgfarm.imageformats import partclone as pc
from imgfarm.imageformats import partimage as pi

# one test runs partimage restore: on the one worker that runs partimage (two at once fail)
pytestmark = PARTIMAGE_GROUP

SAMPLE = DATA / "sample-ext2.000"
META = json.loads((DATA / "sample-ext2.json").read_text())


def test_sample_is_small_and_described() -> None:
    assert SAMPLE.stat().st_size < 1 << 20
    assert (DATA / "make_sample.sh").exists()
    assert META["partition_size_bytes"] > 0 and len(META["restored_sha256"]) == 64


def test_inspect_reads_headers_only() -> None:
    info = inspect(SAMPLE)
    assert info.filesystem == "ext2fs"
    assert info.compression == "gzip"
    assert info.partition_size == META["partition_size_bytes"]
    assert info.block_size == 1024  # ext2/3 images always use 1 KiB logical blocks
    assert info.block_count * 1024 == info.partition_size
    assert info.label == "imgfarm-sample"
    assert info.version == "0.6.1"
    assert [v.index for v in info.volumes] == [0]
    d = info.to_dict()
    assert d["identifier"].startswith("0x") and json.dumps(d)


def test_reader_restores_like_partimage(tmp_path: Path) -> None:
    target = zero_file(tmp_path / "r.img", META["partition_size_bytes"])
    result = pi.restore_to_file(SAMPLE, target)
    assert sha256_file(target) == META["restored_sha256"]
    assert result.chk_records == result.data_bytes // 65536
    assert result.last_volume == 0


def test_base_name_finds_first_volume() -> None:
    assert inspect(DATA / "sample-ext2").image_name == "sample-ext2"


def test_byte_sum_is_exact() -> None:
    data = os.urandom(300000) + bytes(70000) + b"\xff" * 66000 + b"\x80\x7f" * 5000
    for n in (0, 1, 1000, 1024, 32767, 32768, 32769, 65521, 65536, len(data)):
        s = pi._ByteSum()
        s.update(data[:n])
        assert s.total == sum(data[:n]), n


def test_used_runs() -> None:
    bm = bytes([0b00000111, 0xFF, 0x00, 0b10000000, 0b00000001, 0, 0, 0b01010000])
    assert list(pi.iter_used_runs(bm)) == [(0, 3), (8, 8), (31, 2), (60, 1), (62, 1)]


def _runs_by_bit(bm: bytes) -> list[tuple[int, int]]:
    bits = [(bm[i >> 3] >> (i & 7)) & 1 for i in range(len(bm) * 8)] + [0]
    out, start = [], None
    for i, b in enumerate(bits):
        if b and start is None:
            start = i
        elif not b and start is not None:
            out.append((start, i - start))
            start = None
    return out


def test_used_runs_random_windows() -> None:
    """Runs crossing the window boundaries are joined (memory stays window-sized)."""
    import random

    rnd = random.Random(7)
    for _ in range(200):
        bm = bytes(rnd.choice([0, 0xFF, rnd.randrange(256)]) for _ in range(rnd.randint(0, 40)))
        for window in (1, 2, 3, 7, 1 << 16):
            assert list(pi.iter_used_runs(bm, window)) == _runs_by_bit(bm)


# ---------------------------------------------------------------------------- partclone
def _sample_blocks() -> tuple[pi.LegacyInfo, bytes, bytes]:
    with pi.PartimageReader(SAMPLE) as r:
        data = b"".join(bytes(p) for p in r.data())
        return r.info, r.bitmap, data


def test_partclone_crc_variant() -> None:
    # docs/formats.md B3: start 0xFFFFFFFF, no final inversion == zlib.crc32 ^ 0xFFFFFFFF
    assert pc.pc_crc32(b"123456789") == zlib.crc32(b"123456789") ^ 0xFFFFFFFF == 0x340BC6D9


@pytest.mark.parametrize("piece", [1, 1000, 65536, 1 << 22])
def test_partclone_round_trip(tmp_path: Path, piece: int) -> None:
    info, bitmap, data = _sample_blocks()
    buf = io.BytesIO()
    w = pc.PartcloneWriter(buf, fs_type="EXTFS", device_size=info.partition_size,
                           total_blocks=info.block_count, block_size=1024, bitmap=bitmap)
    for off in range(0, len(data), piece):
        w.write(data[off : off + piece])
    w.close()
    raw = buf.getvalue()
    assert len(raw) == w.stream_bytes
    h = pc.PartcloneHeader.unpack(raw)
    assert (h.fs_type, h.block_size, h.blocks_per_checksum, h.reseed) == ("EXTFS", 1024, 1024,
                                                                          True)
    assert h.used_blocks == h.used_blocks_super == info.used_blocks
    rep = pc.verify_stream(io.BytesIO(raw))
    assert rep.data_bytes == len(data) and rep.checksums == -(-info.used_blocks // 1024)
    target = zero_file(tmp_path / "t.img", info.partition_size)
    pc.restore_to_file(io.BytesIO(raw), str(target))
    assert sha256_file(target) == META["restored_sha256"]


def test_partclone_reader_refuses_damage() -> None:
    info, bitmap, data = _sample_blocks()
    buf = io.BytesIO()
    w = pc.PartcloneWriter(buf, fs_type="EXTFS", device_size=info.partition_size,
                           total_blocks=info.block_count, block_size=1024, bitmap=bitmap)
    w.write(data)
    w.close()
    raw = buf.getvalue()
    cases = {
        20: "header CRC",  # inside the version string
        pc.HEADER_SIZE + 3: "bitmap CRC",
        len(raw) - 5000: "checksum mismatch in group",
    }
    for pos, msg in cases.items():
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        with pytest.raises(ImageError, match=msg):
            pc.verify_stream(io.BytesIO(bytes(bad)), "x.ptcl")
    with pytest.raises(ImageError, match="truncated|ends inside"):
        pc.verify_stream(io.BytesIO(raw[:-10]), "x.ptcl")
    with pytest.raises(ImageError, match="not a partclone image"):
        pc.verify_stream(io.BytesIO(b"\0" * 200), "x.ptcl")


# ---------------------------------------------------------------------------- convert
def test_convert_sample(tmp_path: Path, dest: Path) -> None:
    progress: list[tuple[int, int]] = []
    m = convert_legacy(SAMPLE, dest, progress=lambda d, t: progress.append((d, t))).to_json()
    img = dest / "sample-ext2"
    assert sorted(p.name for p in dest.iterdir()) == ["sample-ext2"]
    assert sorted(p.name for p in img.iterdir()) == ["manifest.json", "part0.ptcl.zst"]
    assert read_manifest(img).to_json() == m
    part = m["partitions"][0]
    assert (part["index"], part["start_bytes"], part["size_bytes"]) == (
        0, 0, META["partition_size_bytes"])
    assert part["filesystem"] == "ext2" and part["partclone_fs"] == "EXTFS"
    assert part["used_bytes"] == part["used_blocks"] * part["block_size"]
    assert m["origin"]["kind"] == "convert" and m["origin"]["source_format"] == "partimage"
    assert m["origin"]["identifier"] == m["origin"]["legacy"]["identifier"]
    assert m["disk"]["size_bytes"] == META["partition_size_bytes"]
    assert progress[-1] == (part["used_bytes"], part["used_bytes"])
    rep = verify_image(img)
    assert rep.format == "partimage-ng" and rep.partitions[0].sha256 == part["sha256"]
    # pure-Python restore of the converted stream == partimage's restore
    import zstandard

    target = zero_file(tmp_path / "t.img", META["partition_size_bytes"])
    with open(img / "part0.ptcl.zst", "rb") as fh, \
            zstandard.ZstdDecompressor().stream_reader(fh) as zr:
        pc.restore_to_file(zr, str(target))  # type: ignore[arg-type]
    assert sha256_file(target) == META["restored_sha256"]


def test_convert_refuses_existing_name(dest: Path) -> None:
    convert_legacy(SAMPLE, dest, name="x")
    with pytest.raises(ImageError, match="already exists"):
        convert_legacy(SAMPLE, dest, name="x")
    with pytest.raises(ImageError, match="invalid image name"):
        convert_legacy(SAMPLE, dest, name="../evil")
    assert sorted(p.name for p in dest.iterdir()) == ["x"]


def _refuse(src: Path, dest: Path, match: str) -> ImageError:
    with pytest.raises(ImageError, match=match) as ei:
        convert_legacy(src, dest)
    assert list(dest.iterdir()) == [], "a failed conversion must leave nothing behind"
    return ei.value


def test_refuses_non_partimage(tmp_path: Path, dest: Path) -> None:
    junk = tmp_path / "x.bin"
    junk.write_bytes(os.urandom(100000))
    err = _refuse(junk, dest, r"x\.bin is not a partimage image")
    assert err.exit_code == 6
    (tmp_path / "empty.000").write_bytes(b"")
    _refuse(tmp_path / "empty.000", dest, "not a partimage image")
    with pytest.raises(ImageError, match="not a partimage image"):
        verify_image(junk)


def test_refuses_flipped_gzip_byte(tmp_path: Path, dest: Path) -> None:
    bad = tmp_path / "flip.000"
    raw = bytearray(SAMPLE.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    bad.write_bytes(raw)
    _refuse(bad, dest, r"flip\.000: (corrupt gzip|CHK CRC mismatch)")


def test_refuses_truncated(tmp_path: Path, dest: Path) -> None:
    bad = tmp_path / "cut.000"
    bad.write_bytes(SAMPLE.read_bytes()[:-1000])
    _refuse(bad, dest, r"cut\.000: gzip stream is truncated|cut\.001 is missing")


def test_refuses_chk_crc_mismatch_uncompressed(tmp_path: Path, dest: Path) -> None:
    raw = bytearray(gzip.decompress(SAMPLE.read_bytes()))
    info = inspect(SAMPLE)
    data_start = (512 + 16388 + 21 + 220 + 23 + 16388 + 18 + info.bitmap_size + 16 + 16388
                  + 22)
    assert raw[data_start - 22 : data_start] == b"MAGIC-BEGIN-DATABLOCKS"
    raw[data_start + 3 * 65536 + 3 * 16 + 1000] ^= 0xFF  # in CHK group 3
    bad = tmp_path / "raw.000"
    bad.write_bytes(raw)
    err = _refuse(bad, dest, r"raw\.000: CHK CRC mismatch at block \d+ \(record 3")
    assert "damaged" in str(err)


def test_refuses_tail_sum_mismatch(tmp_path: Path) -> None:
    raw = bytearray(gzip.decompress(SAMPLE.read_bytes()))
    raw[-16384] ^= 0x01  # the stored qwCRC
    bad = tmp_path / "tail.000"
    bad.write_bytes(raw)
    with pytest.raises(ImageError, match="tail checksum mismatch"):
        verify_image(bad)


def test_uncompressed_copy_converts(tmp_path: Path, dest: Path) -> None:
    raw = tmp_path / "plain"
    raw.write_bytes(gzip.decompress(SAMPLE.read_bytes()))  # unsplit, uncompressed, no suffix
    m = convert_legacy(raw, dest).to_json()
    assert m["name"] == "plain"
    assert m["origin"]["legacy"]["volumes"][0]["compression"] == "none"


# ---------------------------------------------------------------------------- manifest
def test_manifest_validation(tmp_path: Path, dest: Path) -> None:
    m = convert_legacy(SAMPLE, dest).to_json()
    capture = copy.deepcopy(m)
    capture["origin"] = {"kind": "capture", "node": "lab001", "disk": "/dev/sda"}
    capture["disk"]["partition_table"] = {"type": "gpt", "sfdisk": "label: gpt\n"}
    validate_manifest(capture)
    for mutate, msg in [
        (lambda x: x.update(format="clonezilla"), "format"),
        (lambda x: x.update(version=2), "version"),
        (lambda x: x["partitions"][0].update(file="../etc/passwd"), "plain"),
        (lambda x: x["partitions"][0].pop("sha256"), "sha256"),
        (lambda x: x["partitions"][0].update(used_blocks=True), "used_blocks"),
        (lambda x: x["origin"].update(kind="magic"), "origin.kind"),
        (lambda x: x.update(partitions=[]), "no partitions"),
        (lambda x: x["disk"].update(partition_table={"type": "mac"}), "partition_table"),
    ]:
        bad = copy.deepcopy(m)
        mutate(bad)
        with pytest.raises(ImageError, match=msg):
            validate_manifest(bad)
    d = tmp_path / "w"
    d.mkdir()
    write_manifest(d, validate_manifest(capture))
    assert read_manifest(d) == validate_manifest(capture)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ImageError, match="not valid JSON"):
        read_manifest(d)


def test_verify_image_detects_ng_damage(dest: Path) -> None:
    convert_legacy(SAMPLE, dest)
    img = dest / "sample-ext2"
    zst = img / "part0.ptcl.zst"
    raw = bytearray(zst.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    zst.write_bytes(raw)
    with pytest.raises(ImageError,
                       match="part0.ptcl.zst: (corrupt zstd|partclone checksum|sha256)"):
        verify_image(img)
    zst.unlink()
    with pytest.raises(ImageError, match="missing"):
        verify_image(img)
    shutil.rmtree(img)


def _raw_sample() -> bytearray:
    return bytearray(gzip.decompress(SAMPLE.read_bytes()))


def _data_start(raw: bytes) -> int:
    i = raw.index(b"MAGIC-BEGIN-DATABLOCKS") + len(b"MAGIC-BEGIN-DATABLOCKS")
    return i


def test_refuses_chk_position_mismatch(tmp_path: Path) -> None:
    raw = _raw_sample()
    chk = _data_start(raw) + 65536  # first CHK record
    assert raw[chk : chk + 4] == b"CHK\0"
    raw[chk + 8] ^= 0x01  # qwPos
    bad = tmp_path / "pos.000"
    bad.write_bytes(raw)
    with pytest.raises(ImageError, match=r"pos\.000: CHK position mismatch at record 0"):
        verify_image(bad)


def test_refuses_header_checksum_mismatch(tmp_path: Path) -> None:
    raw = _raw_sample()
    raw[512 + 600] ^= 0x20  # inside the description of the main header
    bad = tmp_path / "hdr.000"
    bad.write_bytes(raw)
    with pytest.raises(ImageError, match=r"hdr\.000: main header checksum mismatch"):
        inspect(bad)


def test_verify_legacy_sample() -> None:
    rep = verify_image(SAMPLE)
    assert rep.format == "partimage" and rep.legacy is not None
    assert rep.legacy.chk_records == rep.legacy.data_bytes // 65536
    assert rep.legacy_info and rep.legacy_info["filesystem"] == "ext2fs"


def test_fast_tail_check_agrees(tmp_path: Path) -> None:
    """convert's residue tail check (exact_sum=False) accepts and refuses like the exact one."""
    with pi.PartimageReader(SAMPLE, exact_sum=False) as r:
        for _ in r.data():
            pass
    raw = _raw_sample()
    raw[-16384] ^= 0x01
    bad = tmp_path / "tail.000"
    bad.write_bytes(raw)
    with pi.PartimageReader(bad, exact_sum=False) as r, \
            pytest.raises(ImageError, match="tail checksum mismatch"):
        for _ in r.data():
            pass


# ---------------------------------------------------------------------------- speed knobs
def test_convert_levels_and_verify_modes(tmp_path: Path) -> None:
    """Every zstd level / verify mode gives a valid image of the same partclone stream."""
    import zstandard

    from imgfarm.imageformats import convert as cv

    streams = set()
    for i, kw in enumerate([{}, {"level": -1}, {"level": 3}, {"verify": "written"},
                            {"verify": "full"}, {"verify": True}, {"verify": False},
                            {"zstd_threads": 0}]):
        dest = tmp_path / f"d{i}"
        dest.mkdir()
        m = convert_legacy(SAMPLE, dest, name="x", **kw).to_json()  # type: ignore[arg-type]
        img = dest / "x"
        rep = verify_image(img)
        assert rep.partitions[0].sha256 == m["partitions"][0]["sha256"]
        assert sha256_file(img / cv.PART_FILE) == m["partitions"][0]["sha256"]
        streams.add(zstandard.ZstdDecompressor().decompressobj().decompress(
            (img / cv.PART_FILE).read_bytes()))
    assert len(streams) == 1  # the level changes the compression, never the content
    with pytest.raises(ValueError, match="verify must be"):
        convert_legacy(SAMPLE, tmp_path, name="y", verify="quick")
    assert not (tmp_path / "y").exists()


def test_stream_verify_catches_bad_compressed_bytes(tmp_path: Path, dest: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte changed between zstd and the file (sha256 would match it!) is caught by the
    in-line zstd round trip of verify="stream", and nothing is left behind."""
    from imgfarm.imageformats import convert as cv

    real_write = cv._HashingFile.write
    seen = [0]

    def corrupting_write(self: cv._HashingFile, b: bytes | memoryview) -> int:
        data = bytearray(b)
        if seen[0] < 20000 <= seen[0] + len(data):  # flip a byte inside the data
            data[20000 - seen[0]] ^= 0x01
        seen[0] += len(data)
        return real_write(self, bytes(data))

    monkeypatch.setattr(cv._HashingFile, "write", corrupting_write)
    with pytest.raises(ImageError, match="zstd round trip"):
        convert_legacy(SAMPLE, dest, verify="stream")
    assert list(dest.iterdir()) == []
    seen[0] = 0
    with pytest.raises(ImageError, match="zstd round trip"):
        convert_legacy(SAMPLE, dest, verify="full")
    assert list(dest.iterdir()) == []
    seen[0] = 0  # verify="written", the default, stores it (the sha256 is of the bytes
    convert_legacy(SAMPLE, dest)  # written) ...
    with pytest.raises(ImageError, match="corrupt zstd stream"):  # ... image verify finds it
        verify_image(dest / "sample-ext2")


def test_stream_verify_catches_truncated_output(dest: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfarm.imageformats import convert as cv

    real_close = cv._HashingFile.close

    def close_dropping_last(self: cv._HashingFile) -> None:
        real_close(self)
        self.fh.truncate(self.count - 6)  # the file lost its last bytes (the frame end)

    monkeypatch.setattr(cv._HashingFile, "close", close_dropping_last)
    with pytest.raises(ImageError, match="bytes on disk"):
        convert_legacy(SAMPLE, dest)
    assert list(dest.iterdir()) == []


def test_isal_and_zlib_paths_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ISA-L inflate/crc32 (optional) and plain zlib give the same image and the same refusals."""
    digests = set()
    for mode in ("zlib", pi.INFLATE):
        monkeypatch.setattr(pi, "INFLATE", mode)
        monkeypatch.setattr(pi, "crc32", zlib.crc32 if mode == "zlib" else pi.crc32)
        dest = tmp_path / mode
        dest.mkdir(exist_ok=True)
        m = convert_legacy(SAMPLE, dest, name="x").to_json()
        digests.add(m["partitions"][0]["sha256"])
        bad = tmp_path / f"flip-{mode}.000"
        raw = bytearray(SAMPLE.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        bad.write_bytes(raw)
        with pytest.raises(ImageError, match=r"corrupt gzip|CHK CRC mismatch"):
            convert_legacy(bad, dest, name="y")
        cut = tmp_path / f"cut-{mode}.000"
        cut.write_bytes(SAMPLE.read_bytes()[:-1000])
        with pytest.raises(ImageError, match=r"gzip stream is truncated"):
            convert_legacy(cut, dest, name="z")
        assert sorted(p.name for p in dest.iterdir()) == ["x"]
    assert len(digests) == 1
    buf = os.urandom(70000)
    assert pc.crc32(buf, 12345) == zlib.crc32(buf, 12345)
    assert pi.crc32(memoryview(buf)[5:], 7) == zlib.crc32(buf[5:], 7)
