"""`imgfarm image ...`: the image registry, legacy import, inspection, conversion, verification."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from imgfarm.cli.output import (
    echo,
    handles_errors,
    human_bytes,
    json_option,
    plain,
    print_json,
    say,
    status,
    table,
)
from imgfarm.errors import Conflict, InvalidInput, NotFound
from imgfarm.models.names import check_image_name, converted_name
from imgfarm.models.views import image_view
from imgfarm.protocol import (
    CONVERT_VERIFY,
    CONVERT_VERIFY_DEFAULT,
    ImageFormat,
    JobKind,
    sha256_file,
)

if TYPE_CHECKING:
    from imgfarm.protocol import Manifest

app = typer.Typer(help="List, import, inspect, convert and verify images.", no_args_is_help=True)


@app.command("list")
@handles_errors
def list_images(json_out: bool = json_option()) -> None:
    """Images in the registry."""
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.models.db import session_scope
    from imgfarm.models.images import image_views

    with session_scope() as s:
        views = image_views(s)
    if json_out:
        print_json(views)
        return
    table(["image", "format", "size", "origin", "created"],
          [[v["name"], v["format"], human_bytes(v["size_bytes"]), v["origin"].get("kind", ""),
            v["created_at"]] for v in views])


def _legacy_volumes(first: Path) -> list[Path]:
    """Every file of a legacy image: NAME.000, NAME.001, ..., a split set's pieces, or one file."""
    if first.suffix == ".000":
        base = first.name[:-4]
        return sorted(first.parent.glob(f"{base}.[0-9][0-9][0-9]"))
    # lazy: the image formats load only for the commands that read images
    from imgfarm.imageformats.layers import split_pieces

    return split_pieces(first) or [first]


@app.command("import")
@handles_errors
def import_legacy(
    source: str = typer.Argument(..., help="a legacy partimage image: NAME.000 (its other "
                                 "volumes come along), NAME, a split set's NAME.aa (its "
                                 "other pieces come along), or its directory"),
    name: str = typer.Option("", "--name", "-n", help="name in the registry (default: NAME)"),
    json_out: bool = json_option(),
) -> None:
    """Copy a legacy partimage image into the store and register it (verified first).

    Every header sum, CHK CRC and the tail are checked before anything is
    copied; a damaged image is refused and nothing is registered.  Example:
    `imgfarm image import /old/images/win7.000` registers `win7`.  A Clonezilla
    image directory (it has a `parts` file) is converted into one partimage-ng
    image of the whole disk instead, and registered under the directory's name.
    """
    # lazy: the image formats, SQLAlchemy and Celery load only for the commands that need them
    from imgfarm.imageformats.convert import default_name
    from imgfarm.imageformats.ng import verify_image
    from imgfarm.models.db import session_scope
    from imgfarm.models.images import find_image, image_dir, register_image, store_root

    path = _resolve_path(source)
    if path is None:
        raise NotFound(f"{source}: no such file or directory",
                       hint="give the path of NAME.000 or of the directory holding it")
    if _is_clonezilla(path):
        _convert_clonezilla(path, name or path.resolve().name, out=None, json_out=json_out)
        return
    if path.is_dir():
        raise InvalidInput(f"{source} is a {ImageFormat.NG} image; import takes legacy partimage "
                           "images", hint=f"{ImageFormat.NG} images are registered by capture and "
                           "convert")
    name = name or default_name(path)
    check_image_name(name)
    with session_scope() as s:
        if find_image(s, name) is not None:
            raise Conflict(f"image {name!r} exists already", hint="choose another --name")
    vols = _legacy_volumes(path)
    with status(f"checking every CRC of {path.name} ..."):
        verify_image(vols[0])  # every CRC, before anything is copied
    dest = image_dir(name)
    tmp = store_root() / f".import-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with status(f"copying {len(vols)} volume(s) into the store ..."):
            for v in vols:
                shutil.copyfile(v, tmp / v.name)
            checksums = {v.name: sha256_file(tmp / v.name).sha256 for v in vols}
        if dest.exists():
            raise Conflict(f"{dest} exists in the image store", hint="remove it or choose another name")
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(v.stat().st_size for v in vols)
    try:
        with session_scope() as s:
            img = register_image(s, name, ImageFormat.PARTIMAGE, name, size_bytes=size, checksums=checksums,
                                 origin={"kind": "import", "source_path": str(path)})
            view = image_view(img)
    except BaseException:  # the name was taken meanwhile: no unregistered copy left behind
        shutil.rmtree(dest, ignore_errors=True)
        raise
    if json_out:
        print_json(view)
    else:
        echo(f"imported {name}: {len(vols)} volume(s), {human_bytes(size)}, every CRC checked")


@app.command("remove")
@handles_errors
def remove(
    name: str = typer.Argument(..., help="image to remove from the registry and the store"),
    keep_files: bool = typer.Option(False, "--keep-files", help="unregister only; leave the directory"),
) -> None:
    """Remove an image that no active job uses (its files go too, unless --keep-files)."""
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.models.db import session_scope
    from imgfarm.models.images import unregister_image

    with session_scope() as s:
        location = unregister_image(s, name)
    if not keep_files and location.is_dir():
        trash = location.with_name(f".removed-{name}")
        location.rename(trash)  # out of sight at once, then deleted
        shutil.rmtree(trash, ignore_errors=True)
    echo(f"removed image {name}" + (" (files kept)" if keep_files else ""))


def _resolve_path(source: str) -> Path | None:
    """What a typed path means: an ng image directory, or the NAME.000 of a legacy image
    (from NAME.000, NAME, another volume NAME.001, or a directory holding one); None when
    nothing is there."""
    # lazy: the image formats (zstandard, ISA-L) load only for the commands that read images
    from imgfarm.imageformats.partimage import legacy_first_volume, volume_paths

    path = Path(source)
    if path.is_dir():
        if (path / "manifest.json").is_file() or (path / "parts").is_file():
            return path  # a partimage-ng image, or a Clonezilla image directory
        firsts = sorted(p.name for p in path.glob("*.000"))
        if len(firsts) > 1:
            raise InvalidInput(f"{source} holds {len(firsts)} legacy images "
                               f"({', '.join(firsts[:4])}{', ...' if len(firsts) > 4 else ''})",
                               hint="name the one you mean: DIR/NAME.000")
        if firsts:
            return legacy_first_volume(path)
        sets = sorted(p.name for p in (*path.glob("*.aa"), *path.glob("*.aaa")))
        if len(sets) > 1:
            raise InvalidInput(f"{source} holds {len(sets)} split sets ({', '.join(sets[:4])}"
                               f"{', ...' if len(sets) > 4 else ''})",
                               hint="name the one you mean: DIR/NAME.aa")
        if sets:
            return path / sets[0]
        raise NotFound(f"{source} holds no image (no manifest.json, no parts file, no NAME.000, "
                       "no NAME.aa)",
                       hint="give an image directory (partimage-ng or Clonezilla's), or the path "
                            "of NAME.000 or NAME.aa")
    first = volume_paths(path)[0]  # NAME, NAME.001 -> NAME.000
    return first if first.is_file() else None


def _resolve_source(source: str) -> Path:
    """A path (see _resolve_path) or a registered image name; unknown -> NotFound."""
    path = _resolve_path(source)
    if path is not None:
        return path
    if "/" in source or source.startswith("."):
        raise NotFound(f"{source}: no such file or directory",
                       hint="give the path of NAME.000 (or of the image directory), or a "
                            "registered image name (`imgfarm image list`)")
    # lazy: the image formats and SQLAlchemy load only for the commands that need them
    from imgfarm.imageformats.partimage import legacy_first_volume
    from imgfarm.models.db import session_scope
    from imgfarm.models.images import get_image, store_root

    with session_scope() as s:
        img = get_image(s, source)
        d = store_root() / img.location
    if img.format == ImageFormat.PARTIMAGE:
        return legacy_first_volume(d)
    return d


@app.command("inspect")
@handles_errors
def inspect(
    source: str = typer.Argument(..., help="image name, or path to a NAME.000 / image directory"),
    json_out: bool = json_option(),
) -> None:
    """Print an image's headers or manifest without converting anything."""
    path = _resolve_source(source)
    if _is_clonezilla(path):
        # lazy: the image formats (zstandard, ISA-L) load only for the commands that read images
        from imgfarm.imageformats.clonezilla import read_dir

        cz = read_dir(path)
        info: dict[str, Any] = {
            "clonezilla": str(path), "disk": cz.disk, "partition_table": cz.table_type,
            "size_bytes": cz.size_bytes, "boot_area_bytes": len(cz.head),
            "partitions": [{"dev": p.dev, "mode": p.mode, "start_bytes": p.start_bytes,
                            "size_bytes": p.size_bytes, "type": p.type, "fs": p.fs,
                            "files": [f.name for f in p.files]} for p in cz.parts]}
    elif path.is_dir():
        info = json.loads((path / "manifest.json").read_text())
    else:
        # lazy: the image formats (zstandard, ISA-L) load only for the commands that read images
        from imgfarm.imageformats.partimage import inspect as pi_inspect

        info = pi_inspect(path).to_dict()
    if json_out:
        print_json(info)
        return
    _print_tree(info)


def _print_tree(data: Any, indent: int = 0) -> None:
    """Nested headers as indented `key  value` lines; sizes also in KiB/MiB/GiB."""
    pad = " " * indent
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, dict | list) and value:
                say(pad, key)
                _print_tree(value, indent + 2)
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1024 and (
                    key.endswith(("_bytes", "_size", "size"))):
                value = f"{value} ({human_bytes(value)})"
            say(f"{pad}{plain(key):{max(22 - indent, 8)}} ", value)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            say(f"{pad}[{i}]")
            _print_tree(item, indent + 2)
    else:
        say(pad, data)


@app.command("verify")
@handles_errors
def verify(
    source: str = typer.Argument(..., help="image name, or path"),
    json_out: bool = json_option(),
) -> None:
    """Check every CRC and sha256 of an image; exit non-zero on the first fault."""
    # lazy: the image formats (zstandard, ISA-L) load only for the commands that read images
    from imgfarm.imageformats.ng import verify_image

    path = _resolve_source(source)
    if _is_clonezilla(path):
        raise InvalidInput(f"{source} is a Clonezilla image directory: its checks run when it "
                           "is converted", hint=f"imgfarm image convert {source} --out DIR "
                           "checks every partition's CRCs without registering anything")
    report = verify_image(path)
    data = dataclasses.asdict(report)
    if json_out:
        print_json(data)
        return
    if data.get("legacy"):
        r = data["legacy"]
        echo(f"{source}: OK (partimage, {r['volumes']} volume(s)): header sums, "
             f"{r['chk_records']} CHK CRCs and the tail checked over "
             f"{human_bytes(r['data_bytes'])} of block data")
        return
    parts = data.get("partitions") or []
    echo(f"{source}: OK ({data.get('format')}, {len(parts)} partition stream(s))")
    for p in parts:
        echo(f"  {p['file']}: sha256 matches the manifest ({human_bytes(p['stream_bytes'])}); "
             f"{p['checksums']} partclone CRCs checked over {human_bytes(p['data_bytes'])}")


@app.command("convert")
@handles_errors
def convert(
    source: str = typer.Argument(..., help="legacy image name, or path to NAME.000, to an "
                                 "unsplit image, to a split set (NAME.aa, ...), or to a "
                                 "Clonezilla image directory"),
    out: Path | None = typer.Option(None, "--out", help="write the image under DIR, do not register it"),
    name: str = typer.Option("", "--name", help="name of the new image (registered in the store)"),
    verify: str = typer.Option(CONVERT_VERIFY_DEFAULT, "--verify", help="what must hold before "
                               "the image gets its name: 'written' (every input check: volume "
                               "headers, header sums, every CHK CRC, the tail; sha256 of exactly "
                               "the bytes written; fsync; size on disk), 'stream' (also every "
                               "zstd frame decoded again: 15-20% more CPU, catches a fault of the "
                               "compressor itself), 'full' (stream, then a read-back of the new "
                               "image). 'written' is enough because zstd's own frame checksums "
                               "and partclone's CRCs are in the file: `imgfarm image verify` "
                               "and every restore check them (docs/formats.md)"),
    json_out: bool = json_option(),
) -> None:
    """Convert a legacy partimage image to partimage-ng here and now (no broker needed).

    Every volume header, CHK CRC and the tail are checked while converting; the
    new image is renamed into place only when all of them held, so a failed
    conversion leaves nothing behind.  SOURCE is a registered legacy image or a
    path: `imgfarm image convert /old/win7.000 --name win7-ng`.  To convert on
    the farm's CPU workers instead, use `imgfarm convert IMAGE`.
    """
    # lazy: the image formats (zstandard, ISA-L) load only for the commands that read images
    from imgfarm.imageformats.convert import convert_legacy

    if verify not in CONVERT_VERIFY:
        raise InvalidInput(f"--verify {verify!r}: not one of {', '.join(CONVERT_VERIFY)}")
    path = _resolve_source(source)
    if _is_clonezilla(path):
        _convert_clonezilla(path, name or converted_name(path.resolve().name), out=out,
                            json_out=json_out, verify=verify)
        return
    if path.is_dir():
        raise InvalidInput(f"{source} is a {ImageFormat.NG} image already; there is nothing to "
                           "convert", hint="`imgfarm image convert` takes a legacy partimage "
                           "image (NAME.000)")
    # lazy: the image formats load only for the commands that read images
    from imgfarm.imageformats.convert import default_name

    typed = Path(source)
    stem = default_name(path) if "/" in source or typed.exists() else source
    target = name or converted_name(stem)
    check_image_name(target)
    started = time.monotonic()
    manifest, dest_dir = _convert_here(
        path, target, out, lambda dest, progress: convert_legacy(
            path, dest, name=target, progress=progress, verify=verify))
    if json_out:
        print_json(manifest.to_json())
    else:
        part = manifest.partitions[0]
        echo(f"converted {path.name} -> {dest_dir / target} ({part.filesystem}, "
             f"{human_bytes(part.used_bytes)} used -> {human_bytes(part.stream_bytes)} "
             f"zstd, {time.monotonic() - started:.1f} s; every CRC checked"
             f"{'' if out is not None else f', registered as {target}'})")


def _convert_here(path: Path, target: str, out: Path | None,
                  run: Callable[[Path, Callable[[int, int], None]], Manifest]
                  ) -> tuple[Manifest, Path]:
    """`run(dest_dir, progress)` into --out DIR, or into the store and registered as `target`.

    One copy of the rule for both kinds of source: the name must be free in the
    registry before any work, the spinner shows the progress, and an image that
    cannot be registered (the name was taken meanwhile) is removed again, so no
    unregistered image is left in the store. Returns (manifest, dest_dir)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        dest_dir = out
    else:
        # lazy: SQLAlchemy loads only for the commands that use the job database
        from imgfarm.models.db import session_scope
        from imgfarm.models.images import find_image, register_converted, store_root

        with session_scope() as s:
            if find_image(s, target) is not None:
                raise Conflict(f"image {target!r} exists already", hint="choose another --name")
        dest_dir = store_root()
    with status(f"converting {path.name} ...") as update:
        def progress(done: int, total: int) -> None:
            update(f"converting {path.name}: {100.0 * done / max(total, 1):.0f}% "
                   f"({human_bytes(done)} of {human_bytes(total)})")

        manifest = run(dest_dir, progress)
    if out is None:
        try:
            with session_scope() as s:
                register_converted(s, target, manifest,
                                   origin={"kind": JobKind.CONVERT, "source": str(path)})
        except BaseException:  # e.g. the name was taken meanwhile: no unregistered leftovers
            shutil.rmtree(dest_dir / target, ignore_errors=True)
            raise
    return manifest, dest_dir


def _is_clonezilla(path: Path) -> bool:
    return path.is_dir() and (path / "parts").is_file() and not (path / "manifest.json").exists()


def _convert_clonezilla(path: Path, target: str, *, out: Path | None, json_out: bool,
                        verify: str = CONVERT_VERIFY_DEFAULT) -> None:
    """A Clonezilla disk directory -> one partimage-ng image, under --out or registered.

    Every partition listed in `parts` is converted and checked before the image
    is renamed into place, and it is registered only then: a partition saved by
    ntfsclone or dd, or one with no image, refuses the whole directory."""
    # lazy: the image formats (zstandard, ISA-L) load only for the commands that read images
    from imgfarm.imageformats.clonezilla import convert_dir, read_dir

    check_image_name(target)
    read_dir(path)  # the refusals that need no data, before the database is touched
    started = time.monotonic()
    manifest, dest_dir = _convert_here(
        path, target, out, lambda dest, progress: convert_dir(
            path, dest, name=target, progress=progress, verify=verify))
    if json_out:
        print_json(manifest.to_json())
        return
    echo(f"converted Clonezilla image {path.name} -> {dest_dir / target}: "
         f"{len(manifest.partitions)} partition(s), partition table and boot area kept, "
         f"{human_bytes(manifest.stream_bytes)} zstd, {time.monotonic() - started:.1f} s; "
         f"every CRC checked{'' if out is not None else f', registered as {target}'}")
    for p in manifest.partitions:
        echo(f"  {p.name}: {p.filesystem}, {human_bytes(p.used_bytes)} used")
