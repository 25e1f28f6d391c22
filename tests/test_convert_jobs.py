"""Conversion as a farm job: `imgfarm convert`, `restore --convert`, and offline refusals.

A real job worker and a real CPU worker (prefork, queue imgfarm.cpu) on real
Redis; the converted image is restored by the real agent with stock
partclone and must give the bytes partimage itself gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.farm import Farm

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

LEGACY = Path(__file__).parent / "data" / "legacy"
SAMPLE = json.loads((LEGACY / "sample-ext2.json").read_text())


def _partition_sha(disk: Path) -> str:
    with open(disk, "rb") as fh:
        return hashlib.sha256(fh.read(SAMPLE["partition_size_bytes"])).hexdigest()


def test_restore_with_convert_converts_once_then_restores(farm: Farm) -> None:
    farm.start_api()
    farm.start_worker()
    farm.start_worker("cpu", concurrency=1, cpu=True)
    farm.cli("image", "import", str(LEGACY / "sample-ext2.000"), "--name", "old")
    size = -(-SAMPLE["partition_size_bytes"] // (1 << 20))
    disks = [farm.add_node(f"n{i}", "--group", "lab", size_mib=size) for i in (1, 2, 3)]

    out = farm.cli("restore", "@lab", "--image", "old", "--convert", "--wait")
    assert "succeeded" in out.stdout
    jobs = farm.cli_json("jobs")
    kinds = sorted(j["kind"] for j in jobs)
    assert kinds == ["convert", "restore", "restore", "restore"]  # one conversion for three nodes
    assert {j["state"] for j in jobs} == {"succeeded"}
    for disk in disks:
        assert _partition_sha(disk) == SAMPLE["restored_sha256"]
    images = {i["name"]: i for i in farm.cli_json("image", "list")}
    assert images["old-ng"]["format"] == "partimage-ng"
    assert images["old-ng"]["origin"]["source_image"] == "old"
    conv = next(j for j in jobs if j["kind"] == "convert")
    events = farm.cli_json("job", str(conv["id"]))["events"]
    assert [e["state"] for e in events if e["kind"] == "state"] == [
        "queued", "running", "finalizing", "succeeded"]

    # a second --convert restore reuses the converted image: no new conversion
    farm.cli("restore", "n1", "--image", "old", "--convert", "--wait")
    assert sum(j["kind"] == "convert" for j in farm.cli_json("jobs")) == 1
    shown = " ".join(farm.cli("image", "verify", "old-ng").stdout.split())
    assert "old-ng: OK (partimage-ng, 1 partition stream(s))" in shown
    assert "sha256 matches the manifest" in shown and "partclone CRCs checked" in shown
    shown = " ".join(farm.cli("image", "verify", "old").stdout.split())
    assert "old: OK (partimage, 1 volume(s)): header sums," in shown and "CHK CRCs" in shown


def test_convert_task_and_refusals(farm: Farm, tmp_path: Path) -> None:
    farm.start_api()
    farm.start_worker()
    farm.start_worker("cpu", concurrency=1, cpu=True)
    farm.cli("image", "import", str(LEGACY / "sample-ext2.000"), "--name", "old")
    farm.cli("convert", "old", "--name", "new", "--wait")
    assert {i["name"] for i in farm.cli_json("image", "list")} == {"old", "new"}

    # a corrupt legacy image: refused, exit 6, nothing registered, nothing left behind
    bad = tmp_path / "bad.000"
    data = bytearray((LEGACY / "sample-ext2.000").read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    out = farm.cli("image", "convert", str(bad), "--name", "broken", check=False)
    assert out.returncode == 6, out.stderr
    out = farm.cli("image", "import", str(bad), "--name", "broken", check=False)
    assert out.returncode == 6, out.stderr
    store = farm.root / "data" / "images"
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["new", "old"]
    assert not any(p.name.startswith(".") and "broken" in p.name for p in store.iterdir())
    shown = farm.cli("image", "inspect", "old").stdout
    assert "filesystem             ext2fs" in shown
    assert f"partition_size         {SAMPLE['partition_size_bytes']} (" in shown  # + KiB/MiB
    assert "volumes\n  [0]\n    index              0" in shown
    notimg = tmp_path / "notes.txt"
    notimg.write_text("hello")
    out = farm.cli("image", "inspect", str(notimg), check=False)
    assert out.returncode == 6 and "not a partimage image" in out.stderr
    out_dir = tmp_path / "out"
    farm.cli("image", "convert", str(LEGACY / "sample-ext2.000"), "--out", str(out_dir))
    manifest = json.loads((out_dir / "sample-ext2-ng" / "manifest.json").read_text())
    assert manifest["format"] == "partimage-ng"
    assert {i["name"] for i in farm.cli_json("image", "list")} == {"old", "new"}  # --out registers nothing
    out = farm.cli("image", "convert", str(LEGACY / "sample-ext2.000"), "--name", "new", check=False)
    assert out.returncode == 4 and "image 'new' exists already" in out.stderr
    out = farm.cli("image", "convert", str(LEGACY / "sample-ext2.000"), "--name", "third")
    assert "every CRC checked, registered as third" in " ".join(out.stdout.split())
    shutil.rmtree(out_dir)

    # the same refusal on the CPU queue: a registered legacy image damaged on disk later
    farm.cli("image", "import", str(LEGACY / "sample-ext2.000"), "--name", "rotten")
    (vol,) = (store / "rotten").glob("*.000")
    raw = bytearray(vol.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    vol.write_bytes(bytes(raw))
    before = sorted(p.name for p in store.iterdir())
    out = farm.cli("convert", "rotten", "--wait", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    conv = next(j for j in farm.cli_json("jobs", "--kind", "convert") if j["image"] == "rotten-ng")
    assert conv["state"] == "failed" and "corrupt" in conv["error"], conv
    assert "rotten-ng" not in {i["name"] for i in farm.cli_json("image", "list")}
    assert sorted(p.name for p in store.iterdir()) == before  # no dir, no temp dir left


def test_restore_into_a_partition_given_per_job(farm: Farm, tmp_path: Path) -> None:
    """`--disk` overrides the node's disk for one job: a converted partition image goes to
    the device named (here a second sim disk file), and the node's own disk is untouched."""
    farm.start_api()
    farm.start_worker()
    farm.cli("image", "convert", str(LEGACY / "sample-ext2.000"), "--name", "part-ng")
    size = -(-SAMPLE["partition_size_bytes"] // (1 << 20))
    own = farm.add_node("p1", size_mib=size)
    other = tmp_path / "p1-sda1.img"
    with open(other, "wb") as fh:
        fh.truncate(size << 20)
    out = farm.cli("restore", "p1", "--image", "part-ng", "--disk", "relative/path", check=False)
    assert out.returncode == 2 and "bad --disk 'relative/path'" in out.stderr
    farm.cli("restore", "p1", "--image", "part-ng", "--disk", str(other), "--wait")
    assert _partition_sha(other) == SAMPLE["restored_sha256"]
    assert not any(own.read_bytes())  # the node's --disk was not written
    job = farm.cli_json("jobs")[0]
    assert job["state"] == "succeeded"
