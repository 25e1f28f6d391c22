"""A Clonezilla disk directory, made here the way Clonezilla's savedisk makes one, imported
as one partimage-ng image and restored through the farm onto a sim node (root).

The source is a two-partition MBR disk with boot code in its boot area: the ext3
partition saved in partimage mode (``partimage -z0 ... stdout | gzip | split``), the
FAT32 one in partclone mode (``partclone.vfat -c | gzip | split``), next to ``disk``,
``parts``, ``sda-pt.sf`` (``sfdisk -d``), ``sda-mbr`` and ``sda-hidden-data-after-mbr``.
After the restore the whole target disk must equal the source, partition table and
boot area included.  Refusals (a partition with no image, one saved by ntfsclone)
register nothing and leave nothing in the store.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.farm import Farm
from tests.support import loop_device_at, run, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices)")]

ENV = {**os.environ, "TERM": os.environ.get("TERM") or "xterm", "MTOOLS_SKIP_CHECK": "1"}
P1 = (2048, 40960)  # start, sectors: ext3, partimage mode
P2 = (43008, 153600)  # FAT32, partclone mode


def _sh(cmd: str) -> None:
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=ENV, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=300)
    assert p.returncode == 0, f"{cmd[:120]}: {p.stderr[-2000:]!r}"


def make_source_disk(path: Path, tmp: Path) -> None:
    with open(path, "wb") as fh:
        fh.truncate((P2[0] + P2[1]) * 512)
    run("sfdisk", "-q", path, input=f"label: dos\nlabel-id: 0x1badcafe\nstart={P1[0]}, size={P1[1]}, "
        f"type=83, bootable\nstart={P2[0]}, size={P2[1]}, type=c\n")
    with open(path, "r+b") as fh:  # boot code in sector 0 and after it, as a boot loader leaves
        fh.write(b"\xeb\x63\x90" + b"BOOT" * 100)
        fh.seek(4096)
        fh.write(b"STAGE1.5" * 1000)
    files = tmp / "files"
    files.mkdir()
    (files / "blob").write_bytes(os.urandom(1 << 20))
    (files / "text.txt").write_text("imgfarm clonezilla\n" * 20000)
    with loop_device_at(path, P1[0] * 512, P1[1] * 512) as p1, \
            loop_device_at(path, P2[0] * 512, P2[1] * 512) as p2:
        run("mkfs.ext3", "-q", "-F", "-b", "1024", "-d", files, p1)
        run("mkfs.vfat", "-F", "32", "-n", "CZFAT", p2)
        subprocess.run(["mcopy", "-s", "-i", p2, str(files / "blob"), str(files / "text.txt"), "::"],
                       check=True, env=ENV, capture_output=True)


def clonezilla_savedisk(disk: Path, out: Path) -> None:
    """What Clonezilla's savedisk writes for this disk (ocs-functions), with its own commands."""
    out.mkdir()
    (out / "disk").write_text("sda\n")
    (out / "parts").write_text("sda1 sda2\n")
    dump = run("sfdisk", "-d", disk).stdout.replace(str(disk), "/dev/sda")
    (out / "sda-pt.sf").write_text(dump)
    _sh(f"dd if='{disk}' of='{out}/sda-mbr' bs=512 count=1 status=none")
    _sh(f"dd if='{disk}' of='{out}/sda-hidden-data-after-mbr' skip=1 bs=512 count={P1[0] - 1} "
        "status=none")
    (out / "Info-saved-by-cmd.txt").write_text("ocs-sr -q2 -j2 -z1 -i 1 savedisk test sda\n")
    with loop_device_at(disk, P1[0] * 512, P1[1] * 512) as p1, \
            loop_device_at(disk, P2[0] * 512, P2[1] * 512) as p2:
        _sh(f"partimage -M -f3 -o -d -b -c -z0 --volume=0 -B gui=no save {p1} stdout | gzip -c "
            f"| split -a 2 -b 1000000 - '{out}/sda1.'")
        _sh(f"partclone.vfat -c -s {p2} -o - -L /dev/null | gzip -c | split -a 2 -b 1000000 - "
            f"'{out}/sda2.vfat-ptcl-img.gz.'")
    assert len(list(out.glob("sda1.a?"))) >= 2 and list(out.glob("sda2.vfat-ptcl-img.gz.aa"))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Path]:
    disk = tmp_path / "src.img"
    make_source_disk(disk, tmp_path)
    cz = tmp_path / "2026-12-01-img"
    clonezilla_savedisk(disk, cz)
    return disk, cz


def test_clonezilla_disk_restores_through_the_farm(farm: Farm, saved: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    src, cz = saved
    farm.start_api()
    farm.start_worker()
    shown = farm.cli_json("image", "inspect", str(cz))
    assert [(p["dev"], p["mode"]) for p in shown["partitions"]] == [
        ("sda1", "partimage"), ("sda2", "partclone")]

    out = farm.cli("image", "import", str(cz), "--name", "cz")
    assert "2 partition(s)" in out.stdout and "registered as cz" in out.stdout, out.stdout
    manifest = json.loads((farm.root / "data" / "images" / "cz" / "manifest.json").read_text())
    parts = [(p["index"], p["filesystem"], p["partclone_fs"], p["start_bytes"]) for p in manifest["partitions"]]
    assert parts == [(1, "ext3", "EXTFS", P1[0] * 512), (2, "vfat", "FAT32", P2[0] * 512)]
    assert manifest["disk"]["partition_table"]["type"] == "dos"
    assert manifest["disk"]["head"]["bytes"] == P1[0] * 512
    assert manifest["origin"]["legacy"]["shape"] == "clonezilla"
    assert manifest["origin"]["source_path"] == str(cz.resolve())
    farm.cli("image", "verify", "cz")

    dst = farm.add_node("cz1", size_mib=(P2[0] + P2[1]) // 2048)
    farm.cli("restore", "cz1", "--image", "cz", "--wait")
    assert filecmp.cmp(src, dst, shallow=False), "restored disk differs from the source"
    # --convert on it (as a window with convert would): nothing to convert, restored as it is
    dst2 = farm.add_node("cz2", size_mib=(P2[0] + P2[1]) // 2048)
    farm.cli("restore", "cz2", "--image", "cz", "--convert", "--wait")
    assert filecmp.cmp(src, dst2, shallow=False), "restored disk differs from the source"
    assert [j["kind"] for j in farm.cli_json("jobs")] == ["restore", "restore"]


def test_refusals_register_nothing(farm: Farm, saved: tuple[Path, Path]) -> None:
    _src, cz = saved
    store = farm.root / "data" / "images"
    # parts names a partition that has no image
    for f in cz.glob("sda2.*"):
        f.rename(f.with_name("keep-" + f.name))
    r = farm.cli("image", "import", str(cz), "--name", "cz", check=False)
    msg = " ".join((r.stdout + r.stderr).split())
    assert r.returncode != 0 and "parts names sda2, but the directory has no image of it" in msg, msg
    # a partition saved by ntfsclone
    (cz / "sda2.ntfs-img.gz.aa").write_bytes(b"\x1f\x8b" + bytes(100))
    r = farm.cli("image", "convert", str(cz), "--name", "cz", check=False)
    msg = " ".join((r.stdout + r.stderr).split())
    assert r.returncode != 0 and "partition sda2 was saved by ntfsclone (sda2.ntfs-img.gz.aa)" in msg, msg
    assert farm.cli_json("image", "list") == []
    assert not store.exists() or [p.name for p in store.iterdir() if not p.name.startswith(".incoming")] == []
    shutil.rmtree(cz)


def test_split_set_restores_with_partimage_and_in_a_window_with_convert(
        farm: Farm, saved: tuple[Path, Path], tmp_path: Path) -> None:
    """One partimage-mode partition (gzip, split) imported as a legacy image: the agent
    restores it with partimage from stdin, and a maintenance window with --convert whose
    image it is converts it once and restores the result (its restores are submitted as
    `restore --convert` submits them: submit_restore(convert=True)). Both at once."""
    import hashlib

    src, cz = saved
    old = tmp_path / "old"
    old.mkdir()
    for f in cz.glob("sda1.a?"):
        shutil.copy(f, old / f.name)
    with open(src, "rb") as fh:
        fh.seek(P1[0] * 512)
        want = hashlib.sha256(fh.read(P1[1] * 512)).hexdigest()
    farm.start_api()
    farm.start_worker()
    farm.start_worker("cpu", concurrency=1, cpu=True)
    out = farm.cli("image", "import", str(old / "sda1.ab"), "--name", "old")
    assert "imported old" in out.stdout
    size_mib = P1[1] // 2048
    disks = [farm.add_node("o1", size_mib=size_mib),
             farm.add_node("w1", "--group", "win", size_mib=size_mib)]
    farm.cli("restore", "o1", "--image", "old")
    farm.cli("window", "add", "win-now", "--cron", "0 3 1 1 *", "--duration", "5",
             "--group", "win", "--image", "old", "--convert")
    opened = farm.cli_json("window", "run-now", "win-now")
    assert list(opened["submitted"]) == ["w1"], opened

    wait_for(lambda: (st := farm.job_states()) and len(st) == 3
             and set(st.values()) <= {"succeeded", "failed", "cancelled"}, 90, interval=0.25,
             what="the restore and the window's jobs to end")
    jobs = farm.cli_json("jobs")
    assert sorted((j["kind"], j["node"] or "", j["submitted_by"] == "window:win-now", j["state"])
                  for j in jobs) == [
        ("convert", "", True, "succeeded"), ("restore", "o1", False, "succeeded"),
        ("restore", "w1", True, "succeeded")], jobs
    assert next(j["image"] for j in jobs if j["node"] == "w1") == "old-ng"
    for disk in disks:
        with open(disk, "rb") as fh:
            assert hashlib.sha256(fh.read(P1[1] * 512)).hexdigest() == want, disk
    images = {i["name"]: i["format"] for i in farm.cli_json("image", "list")}
    assert images == {"old": "partimage", "old-ng": "partimage-ng"}
