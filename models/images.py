"""The image registry (rows) and the image store (directories).

An image is a directory in the store named after the image: a partimage-ng
image holds manifest.json and one zstd-compressed partclone stream per
partition; a legacy partimage image holds NAME.000, NAME.001, ... Names are
checked strictly, so no name can point outside the store (`../x`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from imgfarm.config.settings import get_settings
from imgfarm.errors import Conflict, InvalidInput, NotFound
from imgfarm.models import states
from imgfarm.models.names import check_image_name
from imgfarm.models.tables import Image, Job
from imgfarm.models.views import image_view
from imgfarm.protocol import ImageFormat, Manifest

INCOMING = ".incoming"


def check_format(fmt: str) -> ImageFormat:
    try:
        return ImageFormat(fmt)
    except ValueError:
        raise InvalidInput(f"unknown image format {fmt!r}",
                           hint=f"one of {', '.join(ImageFormat)}") from None


def incoming_location(job_id: int) -> str:
    """Where a capture writes, relative to the store: nothing there is taken for an image."""
    return f"{INCOMING}/job-{job_id}"


def store_root() -> Path:
    root = get_settings().store_path
    root.mkdir(parents=True, exist_ok=True)
    return root


def image_dir(name: str) -> Path:
    return store_root() / check_image_name(name)


def incoming_dir(job_id: int) -> Path:
    return store_root() / incoming_location(job_id)


def get_image(session: Session, name: str) -> Image:
    check_image_name(name)
    image = session.scalar(select(Image).where(Image.name == name))
    if image is None:
        raise NotFound(f"image {name!r} not found", hint="see `imgfarm image list`")
    return image


def image_views(session: Session) -> list[dict[str, Any]]:
    """Every registered image by name: `imgfarm image list` and GET /api/v1/images."""
    return [image_view(i) for i in session.scalars(select(Image).order_by(Image.name))]


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


def register_converted(session: Session, name: str, manifest: Manifest,
                       origin: dict[str, Any], source_job_id: int | None = None) -> Image:
    """Register the partimage-ng directory a conversion wrote as store/NAME.

    One place for both ways in (the offline CLI and the convert task): the
    size is the sum of its streams, the checksums the manifest's sha256 per
    stream, and the manifest's own origin record completes `origin`.
    """
    return register_image(
        session, name, ImageFormat.NG, name,
        size_bytes=manifest.stream_bytes, checksums=manifest.checksums,
        manifest=manifest.to_json(), origin={**origin, **manifest.origin.to_json()},
        source_job_id=source_job_id)


def unregister_image(session: Session, name: str) -> Path:
    """Unregister an image that no active job uses; returns its directory in the store
    (left in place: the caller removes it after the commit)."""
    image = get_image(session, name)
    busy = session.scalar(select(Job.id).where(Job.image_name == name, Job.state.in_(states.ACTIVE)))
    if busy:
        raise Conflict(f"image {name!r} is in use by job {busy}", hint=f"wait, or `imgfarm cancel {busy}`")
    session.delete(image)
    return store_root() / image.location
