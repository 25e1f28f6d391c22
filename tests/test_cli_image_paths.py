"""How `imgfarm image inspect|convert|verify` find an image from what a person types.

NAME.000, the base NAME, another volume of the set, the image's directory, or a
registered name; anything else is a clear error naming the input, never a traceback.
Uses the committed legacy sample (made by the real partimage 0.6.9).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgfarm.cli.main import app

SAMPLE = Path(__file__).parent / "data" / "legacy" / "sample-ext2.000"
runner = CliRunner()


def _cli(*args: str) -> tuple[int, str]:
    # wide enough that a path under a long temporary directory stays on one line
    result = runner.invoke(app, ["image", *args], env={"COLUMNS": "300"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "old"
    d.mkdir()
    shutil.copy(SAMPLE, d / "lab.000")
    return d


def test_paths_people_type_find_the_first_volume(settings_env: str, images: Path) -> None:
    for typed in (images / "lab.000", images / "lab", images / "lab.001", images):
        if typed.name == "lab.001":
            (images / "lab.001").write_bytes(b"")  # a later volume: read from lab.000
        code, out = _cli("inspect", str(typed))
        assert code == 0, (typed, out)
        assert f"path {images / 'lab.000'}" in out and "filesystem ext2fs" in out


def test_paths_that_are_not_an_image_are_named(settings_env: str, images: Path,
                                               tmp_path: Path) -> None:
    code, out = _cli("inspect", "/nonexistent/x.000")
    assert code == 3 and "/nonexistent/x.000: no such file or directory" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = _cli("inspect", str(empty))
    assert code == 3 and "holds no image (no manifest.json, no parts file, no NAME.000" in out
    shutil.copy(SAMPLE, images / "other.000")
    code, out = _cli("convert", str(images), "--out", str(tmp_path / "out"))
    assert code == 2 and "holds 2 legacy images (lab.000, other.000)" in out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    code, out = _cli("convert", str(images / "lab.000"), "--out", str(tmp_path / "ng"))
    assert code == 0, out
    code, out = _cli("convert", str(tmp_path / "ng" / "lab-ng"), "--out", str(tmp_path / "ng2"))
    assert code == 2 and "is a partimage-ng image already" in out
    code, out = _cli("verify", "nosuch")
    assert code == 3 and "image 'nosuch' not found" in out


def test_import_names_the_image_after_the_file(settings_env: str, images: Path) -> None:
    code, out = _cli("import", str(images / "lab"))
    assert code == 0 and "imported lab: 1 volume(s)" in out and "every CRC checked" in out
    code, out = _cli("import", str(images / "lab.000"))
    assert code == 4 and "image 'lab' exists already" in out
    code, out = _cli("import", str(images / "nope.000"))
    assert code == 3 and "no such file or directory" in out
    code, out = _cli("list", "--json")
    assert code == 0 and '"name": "lab"' in out



def test_split_set_is_found_imported_and_converted(settings_env: str, tmp_path: Path) -> None:
    """A gzip partimage stream cut by `split` (lab.aa, lab.ab, ...), as Clonezilla keeps them."""
    d = tmp_path / "cz"
    d.mkdir()
    raw = SAMPLE.read_bytes()
    size = len(raw) // 3 + 1
    for i, suffix in enumerate(("aa", "ab", "ac")):
        (d / f"lab.{suffix}").write_bytes(raw[i * size : (i + 1) * size])
    for typed in (d / "lab.aa", d / "lab.ab", d / "lab", d):
        code, out = _cli("inspect", str(typed))
        assert code == 0 and f"path {d / 'lab.aa'}" in out and "lab.ac" in out, (typed, out)
    code, out = _cli("convert", str(d / "lab.ab"), "--out", str(tmp_path / "ng"))
    assert code == 0 and (tmp_path / "ng" / "lab-ng" / "manifest.json").is_file(), out
    code, out = _cli("import", str(d / "lab.aa"))
    assert code == 0 and "imported lab: 3 volume(s)" in out, out
    (d / "lab.ab").unlink()
    code, out = _cli("convert", str(d / "lab.aa"), "--out", str(tmp_path / "ng3"))
    assert code == 6 and "lab.ab is missing" in out, out


def test_convert_verify_modes(settings_env: str, images: Path, tmp_path: Path) -> None:
    code, out = _cli("convert", str(images / "lab.000"), "--out", str(tmp_path / "w"),
                     "--verify", "stream")
    assert code == 0 and (tmp_path / "w" / "lab-ng" / "manifest.json").is_file(), out
    code, out = _cli("convert", str(images / "lab.000"), "--out", str(tmp_path / "x"),
                     "--verify", "quick")
    assert code == 2 and "--verify 'quick': not one of written, stream, full" in out, out
    assert not (tmp_path / "x").exists()


def test_clonezilla_directory_is_recognised(settings_env: str, tmp_path: Path) -> None:
    d = tmp_path / "2026-img"
    d.mkdir()
    (d / "disk").write_text("sda\n")
    (d / "parts").write_text("sda1\n")
    (d / "sda-pt.sf").write_text("label: dos\nunit: sectors\n\n"
                                 "/dev/sda1 : start=2048, size=4096, type=83\n")
    (d / "sda-mbr").write_bytes(bytes(512))
    shutil.copy(SAMPLE, d / "sda1")
    code, out = _cli("inspect", str(d), "--json")
    assert code == 0 and '"mode": "partimage"' in out and '"sda1"' in out, out
    code, out = _cli("verify", str(d))
    assert code == 2 and "is a Clonezilla image directory" in out, out
    (d / "sda1").unlink()
    code, out = _cli("convert", str(d), "--out", str(tmp_path / "out"))
    assert code == 6 and "parts names sda1, but the directory has no image of it" in out, out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
