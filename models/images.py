"""The image registry (rows) and the image store (directories).

An image is a directory in the store named after the image: a partimage-ng
image holds manifest.json and one zstd-compressed partclone stream per
partition; a legacy partimage image holds NAME.000, NAME.001, ... Names are
checked strictly, so no name can point outside the store (`../x`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from imgfarm.config.settings import get_settings
from imgfarm.errors import Conflict, InvalidInput, NotFound
from imgfarm.models.states import FORMATS
from imgfarm.models.tables import Image

IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
INCOMING = ".incoming"


def check_image_name(name: str) -> str:
    if not IMAGE_NAME_RE.match(name or "") or ".." in name:
        raise InvalidInput(
            f"bad image name {name!r}",
            hint="use letters, digits, '.', '_', '+' and '-' (no '/', no '..'), at most 128",
        )
    return name


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown image format {fmt!r}", hint=f"one of {', '.join(FORMATS)}")
    return fmt


def store_root() -> Path:
    root = get_settings().store_path
    root.mkdir(parents=True, exist_ok=True)
    return root


def image_dir(name: str) -> Path:
    return store_root() / check_image_name(name)


def incoming_dir(job_id: int) -> Path:
    return store_root() / INCOMING / f"job-{job_id}"


def get_image(session: Session, name: str) -> Image:
    check_image_name(name)
    image = session.scalar(select(Image).where(Image.name == name))
    if image is None:
        raise NotFound(f"image {name!r} not found", hint="see `imgfarm image list`")
    return image


def find_image(session: Session, name: str) -> Image | None:
    return session.scalar(select(Image).where(Image.name == name))


def register_image(
    session: Session,
    name: str,
    fmt: str,
    location: str,
    *,
    size_bytes: int,
    checksums: dict[str, Any],
    manifest: dict[str, Any] | None = None,
    origin: dict[str, Any] | None = None,
    source_job_id: int | None = None,
) -> Image:
    check_image_name(name)
    check_format(fmt)
    if find_image(session, name) is not None:
        raise Conflict(f"image {name!r} exists already", hint="choose another name")
    image = Image(
        name=name,
        format=fmt,
        location=location,
        size_bytes=size_bytes,
        checksums=checksums,
        manifest=manifest or {},
        origin=origin or {},
        source_job_id=source_job_id,
    )
    session.add(image)
    session.flush()
    return image


def register_converted(session: Session, name: str, manifest: dict[str, Any],
                       origin: dict[str, Any], source_job_id: int | None = None) -> Image:
    """Register the partimage-ng directory a conversion wrote as store/NAME.

    One place for both ways in (the offline CLI and the convert task): the
    size is the sum of its streams, the checksums the manifest's sha256 per
    stream, and the manifest's own origin record completes `origin`.
    """
    parts = manifest.get("partitions", [])
    return register_image(
        session, name, "partimage-ng", name,
        size_bytes=sum(p.get("stream_bytes", 0) for p in parts),
        checksums={p["file"]: p["sha256"] for p in parts},
        manifest=manifest, origin={**origin, **(manifest.get("origin") or {})},
        source_job_id=source_job_id)


def legacy_first_volume(directory: Path) -> Path:
    """The NAME.000 (or single unsplit file) of a legacy image directory."""
    vols = sorted(directory.glob("*.000"))
    if vols:
        return vols[0]
    files = [p for p in directory.iterdir() if p.is_file()]
    if len(files) == 1:
        return files[0]
    raise NotFound(f"no partimage volume (NAME.000) in {directory}")
