"""The farm <-> agent contract (imgfarm.protocol): round trips, refusals that name the field,
and the JSON that agents and image stores hold today still reading."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from imgfarm import protocol
from imgfarm.protocol import (
    CaptureOrigin,
    Disk,
    DiskHead,
    ImageFormat,
    ImageRef,
    JobKind,
    JobSpec,
    LocalStore,
    Manifest,
    Message,
    NfsStore,
    Orders,
    Partition,
    PartitionTable,
    ProgressReport,
    ProtocolError,
    ResultReport,
)

MANIFESTS = Path(__file__).parent / "data" / "manifests"
SHA = "0123456789abcdef" * 4


def _partition(index: int = 1, **kw: Any) -> Partition:
    fields: dict[str, Any] = dict(
        index=index, name=f"part{index}", file=f"part{index}.ptcl.zst", filesystem="ext4",
        partclone_fs="EXTFS", block_size=4096, total_blocks=100, used_blocks=10, total_bytes=409600,
        used_bytes=40960, start_bytes=1 << 20, size_bytes=409600, sha256=SHA, stream_bytes=1234,
        type="83", tool="extfs")
    return Partition(**{**fields, **kw})


def _manifest() -> Manifest:
    return Manifest(
        name="win7+sp1", origin=CaptureOrigin(node="lab001", disk="/dev/sda", job=7),
        disk=Disk(size_bytes=64 << 20, partition_table=PartitionTable(type="dos", sfdisk="label: dos\n"),
                  head=DiskHead(bytes=1 << 20, sha256=SHA)),
        partitions=(_partition(1), _partition(2, file="part2.ptcl.zst", name="part2")))


def _spec(**kw: Any) -> JobSpec:
    fields: dict[str, Any] = dict(
        job_id=12, kind=JobKind.RESTORE, format=ImageFormat.NG, node="lab001", disk_hint="/dev/sda",
        store=NfsStore(export="imagesrv:/srv/images", options="vers=4"),
        image=ImageRef(name="win7-base", location="win7-base", format=ImageFormat.NG,
                       checksums={"part1.ptcl.zst": SHA}))
    return JobSpec(**{**fields, **kw})


MESSAGES: list[Message] = [
    Orders(api_url="http://10.0.0.1:8470", job_id=42, token="t" * 43, disk="/dev/nvme0n1", delay=1.5),
    _spec(),
    _spec(kind=JobKind.CAPTURE, format=ImageFormat.PARTIMAGE, store=LocalStore(path="/srv/images"),
          image=ImageRef(name="new+image"), output_dir=".incoming/job-12"),
    ProgressReport(percent=42.5, bytes_done=10, bytes_total=20, rate=3.5, message="capturing partition 1"),
    ResultReport(ok=True, files={"part1.ptcl.zst": SHA, "win7 (old).000": SHA}, manifest=_manifest(),
                 bytes=99, duration=12.25),
    ResultReport(ok=False, error="partclone.extfs exited 1", stderr_tail="E: \x1b[1mbad\x1b[0m\nsuperblock"),
    _manifest(),
    Manifest.from_json(json.loads((MANIFESTS / "converted-v1.json").read_text())),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_through_json_text(msg: Message) -> None:
    text = json.dumps(msg.to_json())
    assert type(msg).from_json(json.loads(text)) == msg


def test_orders_on_the_kernel_command_line() -> None:
    orders = MESSAGES[0]
    assert isinstance(orders, Orders)
    line = orders.kernel_params()
    assert line == ("imgfarm.api=http://10.0.0.1:8470 imgfarm.job=42 imgfarm.token=" + "t" * 43
                    + " imgfarm.disk=/dev/nvme0n1 imgfarm.delay=1.5")
    assert Orders.from_cmdline(f"BOOT_IMAGE=vmlinuz quiet {line} console=ttyS0") == orders
    plain = Orders(api_url="http://h:1", job_id=1, token="x")
    assert plain.kernel_params() == "imgfarm.api=http://h:1 imgfarm.job=1 imgfarm.token=x"
    # a site's extra parameters come after the farm's: the last one wins, as in the kernel
    assert Orders.from_cmdline(plain.kernel_params() + " imgfarm.delay=3").delay == 3.0
    # the boot image's own parameters are known, and left to its /init
    boot = " BOOTIF=01-52-54-00-12-34-56 imgfarm.nic=eth1 imgfarm.debug=1 imgfarm.after=poweroff"
    assert Orders.from_cmdline(plain.kernel_params() + boot) == plain


@pytest.mark.parametrize("line,field,words", [
    ("quiet", "imgfarm.api", "lacks imgfarm.api=, imgfarm.job="),
    ("imgfarm.api=http://h", "imgfarm.job", "lacks imgfarm.job="),
    ("imgfarm.api=http://h imgfarm.job=one imgfarm.token=t", "imgfarm.job", "not a number"),
    ("imgfarm.api=http://h imgfarm.job=0 imgfarm.token=t", "imgfarm.job", "at least 1"),
    ("imgfarm.api=ftp://h imgfarm.job=1 imgfarm.token=t", "imgfarm.api", "is not an http"),
    ("imgfarm.api=http://h imgfarm.job=1 imgfarm.token=t imgfarm.dsik=/dev/sda", "imgfarm.dsik",
     "unknown parameter"),
    ("imgfarm.api=http://h imgfarm.job=1 imgfarm.token=t imgfarm.disk=sda", "imgfarm.disk",
     "absolute device path"),
    ("imgfarm.api=http://h imgfarm.job=1 imgfarm.token=t imgfarm.delay=nan", "imgfarm.delay", "finite"),
    ("imgfarm.api=http://h imgfarm.job=1 imgfarm.token=a;b", "imgfarm.token", "URL-safe"),
])
def test_bad_orders_name_the_parameter(line: str, field: str, words: str) -> None:
    with pytest.raises(ProtocolError, match=words) as err:
        Orders.from_cmdline(line)
    assert err.value.field == field


def _set(path: str, value: Any) -> Any:
    """A mutation of a JSON object: set the value at a dotted path ([i] for list items)."""
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.replace("[", ".[").split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key[1:-1])] if key.startswith("[") else node[key]
        if value is _DROP:
            del node[last]
        else:
            node[last] = value
    return mutate


_DROP = object()
BAD: list[tuple[type[Message], Message, str, Any, str]] = [
    # type, good message, path, bad value, the error's words
    (JobSpec, _spec(), "surprise", 1, "unknown field"),
    (JobSpec, _spec(), "kind", _DROP, "missing"),
    (JobSpec, _spec(), "kind", "convert", "capture or restore"),
    (JobSpec, _spec(), "format", "clonezilla", "one of partimage-ng, partimage"),
    (JobSpec, _spec(), "job_id", True, "whole number, not true"),
    (JobSpec, _spec(), "job_id", 2**64, "at most"),
    (JobSpec, _spec(), "progress_interval", float("nan"), "finite"),
    (JobSpec, _spec(), "progress_interval", float("inf"), "finite"),
    (JobSpec, _spec(), "progress_interval", "5", "a number, not a string"),
    (JobSpec, _spec(), "node", "lab\x1b[31m001", "control character"),
    (JobSpec, _spec(), "node", "n" * 2000, "at most 1024"),
    (JobSpec, _spec(), "store.type", "ftp", "one of local, nfs, http"),
    (JobSpec, _spec(), "store.export", "-oremount:/x", "server:/export"),
    (JobSpec, _spec(), "store.options", "vers=4 ro", "mount options"),
    (JobSpec, _spec(), "image.name", "../etc", "image name"),
    (JobSpec, _spec(), "image.location", "/etc", "inside the store"),
    (JobSpec, _spec(), "image.location", "a/../../b", "inside the store"),
    (JobSpec, _spec(), "image.checksums['part1.ptcl.zst']", "0xabc", "64 lowercase hex"),
    (JobSpec, _spec(), "image.location", _DROP, "needs the image's directory"),
    (JobSpec, _spec(), "store", [], "must be an object"),
    (ProgressReport, ProgressReport(), "percent", 100.5, "at most 100"),
    (ProgressReport, ProgressReport(), "percent", -1, "at least 0"),
    (ProgressReport, ProgressReport(), "bytes_done", -5, "at least 0"),
    (ProgressReport, ProgressReport(), "bytes_done", 1.5, "whole number"),
    (ProgressReport, ProgressReport(), "rate", float("-inf"), "finite"),
    (ProgressReport, ProgressReport(), "state", "done", "'running'"),
    (ProgressReport, ProgressReport(), "message", None, "a string, not null"),
    (ResultReport, ResultReport(ok=True), "ok", "yes", "true or false"),
    (ResultReport, ResultReport(ok=True), "ok", _DROP, "missing"),
    (ResultReport, ResultReport(ok=True), "stderr_tail", 5, "must be a string"),
    (ResultReport, ResultReport(ok=True, files={"a": SHA}), "files['a']", "zz", "hex"),
    (ResultReport, ResultReport(ok=True, manifest=_manifest()), "manifest.partitions[1].sha256", _DROP,
     "missing"),
    (Manifest, _manifest(), "format", "partimage", "expected 'partimage-ng'"),
    (Manifest, _manifest(), "version", 2, "unsupported version 2"),
    (Manifest, _manifest(), "partitions", [], "no partitions"),
    (Manifest, _manifest(), "partitions[0].file", "../etc/passwd", "plain file name"),
    (Manifest, _manifest(), "partitions[1].file", "part1.ptcl.zst", "unique"),
    (Manifest, _manifest(), "partitions[0].used_blocks", 101, "more than total_blocks"),
    (Manifest, _manifest(), "partitions[0].block_size", 0, "at least 1"),
    (Manifest, _manifest(), "partitions[0].compression", "gzip", "not supported"),
    (Manifest, _manifest(), "origin.kind", "magic", "one of capture, convert"),
    (Manifest, _manifest(), "disk.partition_table.type", "mac", "dos or gpt"),
    (Manifest, _manifest(), "disk.head.sha256", "A" * 64, "lowercase hex"),
    (Manifest, _manifest(), "disk.size_bytes", -1, "at least 0"),
]


@pytest.mark.parametrize("cls,good,path,value,words", BAD, ids=[f"{b[0].__name__}-{b[2]}" for b in BAD])
def test_every_refusal_names_its_field(cls: type[Message], good: Message, path: str, value: Any,
                                       words: str) -> None:
    doc = copy.deepcopy(good.to_json())
    if path.endswith("']"):  # an object's key: "files['a']"
        outer, key = path[:-2].split("['")
        node = doc
        for part in outer.split("."):
            node = node[part]
        node[key] = value
    else:
        _set(path, value)(doc)
    with pytest.raises(ProtocolError, match=words) as err:
        cls.from_json(json.loads(json.dumps(doc)))
    assert err.value.field == path
    assert str(err.value).startswith(f"{path}: ")


def test_checked_on_creation_too() -> None:
    with pytest.raises(ProtocolError, match="percent: must be at most 100"):
        ProgressReport(percent=250)
    with pytest.raises(ProtocolError, match="type: must be nfs"):
        NfsStore(type="local", export="a:/b")
    assert ProgressReport(percent=5).percent == 5.0 and isinstance(ProgressReport(percent=5).percent, float)
    assert _spec(kind="capture", output_dir="x").kind is JobKind.CAPTURE  # enum values become enums


def test_manifest_files_of_todays_stores_still_read(tmp_path: Path) -> None:
    converted = json.loads((MANIFESTS / "converted-v1.json").read_text())
    m = Manifest.from_json(converted)
    assert isinstance(m.origin, protocol.ConvertOrigin) and m.origin.legacy["block_size"] == 1024
    assert m.disk.head is None and m.disk.partition_table is None and m.partitions[0].tool == ""
    captured = Manifest.load(MANIFESTS / "capture-v1.json")
    assert isinstance(captured.origin, CaptureOrigin) and captured.origin.job == 17
    assert [(p.index, p.type, p.tool, p.raw) for p in captured.partitions] == [
        (1, "83", "extfs", False), (2, "c", "fat", False)]
    assert captured.checksums == {"part1.ptcl.zst": "b" * 64, "part2.ptcl.zst": "c" * 64}
    # written again, every key a reader of today's files looks for is there, with its value
    for old, new in ((converted, m.to_json()), (json.loads((MANIFESTS / "capture-v1.json").read_text()),
                                                captured.to_json())):
        assert _subset(old, new)
    # a whole-disk capture as agents write it today (partition_table and head null, no job)
    whole = copy.deepcopy(converted)
    whole["origin"] = {"kind": "capture", "node": "n1", "disk": "/tmp/n1.img"}
    whole["disk"] = {"size_bytes": 12582912, "partition_table": None, "head": None}
    assert Manifest.from_json(whole).origin == CaptureOrigin(node="n1", disk="/tmp/n1.img")
    saved = m.save(tmp_path)
    assert saved.name == "manifest.json" and Manifest.load(tmp_path) == m
    assert not list(tmp_path.glob(".*"))  # no temp file left


def _subset(old: Any, new: Any) -> bool:
    """Every key of `old` is in `new` with the same value (lists item by item); an empty list
    may be left out."""
    if isinstance(old, dict):
        return isinstance(new, dict) and all(
            (k in new and _subset(v, new[k])) or (v == [] and k not in new) for k, v in old.items())
    if isinstance(old, list):
        return isinstance(new, list) and len(old) == len(new) and all(map(_subset, old, new))
    return bool(old == new)


def test_reports_and_specs_of_running_agents_still_read() -> None:
    # what agents before the protocol package posted, and what the farm served them
    assert ResultReport.from_json({"ok": True, "duration": 3, "bytes": 5, "files": {}, "manifest": {}}).manifest is None
    assert ProgressReport.from_json({"state": "running", "percent": 60, "bytes_done": 1, "bytes_total": 2,
                                     "rate": 0.0, "message": ""}).percent == 60.0
    old_spec = {"job_id": 3, "kind": "capture", "format": "partimage-ng", "node": "n1", "disk_hint": "/x.img",
                "store": {"type": "local", "path": "/srv/images"}, "progress_interval": 0.5,
                "image": {"name": "base"}, "output_dir": ".incoming/job-3"}
    assert JobSpec.from_json(old_spec).to_json() == old_spec


def test_sha256_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert protocol.sha256_file(tmp_path / "f") == (hashlib.sha256(data).hexdigest(), len(data))


@pytest.mark.parametrize("name,ok", [
    ("win7+sp1", True), ("win7+sp1-ng", True), ("a.b_c-d", True), ("x" * 128, True),
    ("x" * 129, False), ("../x", False), ("a..b", False), (".hidden", False), ("a/b", False),
    ("", False), ("a b", False), ("win7\n", False)])
def test_one_image_name_rule(name: str, ok: bool) -> None:
    assert bool(protocol.IMAGE_NAME.match(name)) is ok


def test_public_names_are_exported() -> None:
    """__all__ is the package's public face (httpx's habit): every name in it resolves, the
    messages that load on first use included."""
    assert all(getattr(protocol, n) is not None for n in protocol.__all__)
    assert set(protocol._MESSAGES) <= set(protocol.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Manifets'"):
        protocol.Manifets  # noqa: B018


def test_the_enums_load_without_the_messages() -> None:
    """The CLI imports the enums at start-up; the message classes must not come with them."""
    import subprocess
    import sys

    code = ("import sys; from imgfarm.protocol import ImageFormat, JobKind; "
            "print(sorted(m for m in sys.modules if m.startswith('imgfarm.protocol')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['imgfarm.protocol', 'imgfarm.protocol._vocabulary']"
