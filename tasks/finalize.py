"""The end of every job: put the node back to local boot, record, release.

Runs for every outcome (succeeded, failed, timed_out, cancelled). A capture
registers its image here, and only when the files the agent wrote verify
against the checksums it reported (and the image's own CRCs): until then
they sit under the store's .incoming/ directory, where nothing takes them
for an image.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from imgfarm.config.settings import get_settings
from imgfarm.errors import ImgfarmError
from imgfarm.imageformats import ng
from imgfarm.imageformats.partimage import legacy_first_volume
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import find_image, image_dir, incoming_dir, register_image
from imgfarm.models.jobs import add_event, get_job, transition
from imgfarm.models.tables import Node
from imgfarm.protocol import MANIFEST_FILE, ImageFormat, JobKind, Manifest, ProtocolError, sha256_file
from imgfarm.tasks import multicast
from imgfarm.tasks.nodes import node_info, reset_node

log = logging.getLogger(__name__)


def _verify_capture(job_id: int, name: str, fmt: str, result: dict[str, Any]) -> dict[str, Any]:
    """Check the captured files; return registry fields or raise ImgfarmError."""
    src = incoming_dir(job_id)
    reported: dict[str, str] = dict(result.get("files") or {})
    if not src.is_dir() or not reported:
        raise ImgfarmError(f"the agent reported success but wrote no files under {src}")
    size = 0
    for fname, digest in reported.items():
        path = src / fname
        if "/" in fname or not path.is_file():
            raise ImgfarmError(f"captured file {fname} is missing")
        actual = sha256_file(path).sha256
        if actual != digest:
            raise ImgfarmError(
                f"captured file {fname}: sha256 {actual[:16]}... differs from the agent's "
                f"{digest[:16]}..."
            )
        size += path.stat().st_size
    manifest: dict[str, Any] = {}
    if fmt == ImageFormat.NG:
        m = ng.read_manifest(src)
        for part in m.partitions:
            if reported.get(part.file) != part.sha256:
                raise ImgfarmError(f"manifest sha256 of {part.file} differs from the agent's")
        manifest = m.to_json()
    ng.verify_image(src if fmt == ImageFormat.NG else legacy_first_volume(src))
    return {"size_bytes": size, "checksums": reported, "manifest": manifest}


def _verify_restore(image: dict[str, Any] | None, result: dict[str, Any]) -> None:
    """Check a restore's report against the image as the job database registered it.

    Why: an agent's `ok` alone proves nothing (`{"ok": true, "files": {}}` once passed for a
    restore of a disk left all zeros), and the store can change after registration. Every
    stream and the boot area must have been read with the registered sha256, at least the
    registered bytes read, and a partimage-ng restore must have followed the registered
    manifest: a manifest edited in the store is caught here.
    """
    if image is None:
        raise ImgfarmError("the image is no longer registered")
    files: dict[str, str] = dict(result.get("files") or {})
    expected: dict[str, str] = dict(image["checksums"] or {})
    registered = image["manifest"] or {}
    if image["format"] == ImageFormat.NG:
        if not registered:
            raise ImgfarmError(f"image {image['name']!r} has no registered manifest to check against")
        manifest = Manifest.from_json(registered)
        used = result.get("manifest")
        if not used:
            raise ImgfarmError("the agent did not report the manifest it restored from")
        if Manifest.from_json(used).to_json() != manifest.to_json():
            differ = sorted(k for k in set(used) | set(registered) if used.get(k) != registered.get(k))
            raise ImgfarmError(f"the manifest the agent restored from differs from the registered one "
                               f"in {', '.join(differ) or 'its layout'}: the store's manifest.json "
                               "was changed after registration")
        expected.update(manifest.checksums)
        if manifest.disk.head is not None:
            expected[manifest.disk.head.file] = manifest.disk.head.sha256
        need = manifest.stream_bytes
    else:
        need = 1 if image["size_bytes"] else 0
    expected.pop(MANIFEST_FILE, None)
    if not expected:
        raise ImgfarmError(f"image {image['name']!r} has no registered checksums to check against")
    for fname, digest in sorted(expected.items()):
        got = files.get(fname)
        if got is None:
            raise ImgfarmError(f"{fname} is missing from the agent's report")
        if got != digest:
            raise ImgfarmError(f"{fname}: the agent read sha256 {got[:16]}..., the image was "
                               f"registered with {digest[:16]}...")
    done = int(result.get("bytes") or 0)
    if done < need:
        raise ImgfarmError(f"the agent read {done} bytes; the image's streams hold {need}")


def _register_capture(s: Any, job: Any, fields: dict[str, Any]) -> None:
    name, fmt = job.image_name, job.format
    dest = image_dir(name)
    if dest.exists() or find_image(s, name) is not None:
        raise ImgfarmError(f"image {name!r} appeared while the capture ran; not overwritten")
    os.rename(incoming_dir(job.id), dest)
    register_image(
        s,
        name,
        fmt,
        name,
        size_bytes=fields["size_bytes"],
        checksums=fields["checksums"],
        manifest=fields["manifest"],
        origin={"kind": JobKind.CAPTURE, "node": job.node_name, "job": job.id},
        source_job_id=job.id,
    )
    add_event(s, job.id, "note", f"registered image {name} ({fields['size_bytes']} bytes)")


def finalize_job(job_id: int) -> None:
    """finalizing -> outcome: reset the node, register a capture, end the job."""
    settings = get_settings()
    with session_scope() as s:
        job = get_job(s, job_id)
        if job.state != states.FINALIZING:
            return
        outcome = job.outcome or states.FAILED
        node = s.get(Node, job.node_id) if job.node_id else None
        info = node_info(node) if node else None
        kind, name, fmt, result = job.kind, job.image_name, job.format, dict(job.result or {})
        image = None
        if kind == JobKind.RESTORE and outcome == states.SUCCEEDED:
            row = find_image(s, name)
            image = None if row is None else {
                "name": row.name, "format": row.format, "checksums": dict(row.checksums or {}),
                "manifest": dict(row.manifest or {}), "size_bytes": row.size_bytes}
        options = dict(job.options or {})
        # A job that never left `queued` made no driver call: its node is as it was (maybe
        # running someone's work), so ending the job must not reboot it.
        touched = job.boot_calls > 0
        if info is not None and not touched:
            add_event(s, job_id, "note", f"{info.name} was never booted by this job: its boot "
                      "state and power were left as they were")
    errors: list[str] = []
    verified: dict[str, Any] | None = None
    verify_error = ""
    if outcome == states.SUCCEEDED and kind == JobKind.CAPTURE:
        try:  # reading every captured byte: outside any session
            verified = _verify_capture(job_id, name, fmt, result)
        except (ImgfarmError, OSError, ValueError, KeyError) as exc:
            outcome, verify_error = states.FAILED, f"capture did not verify: {exc}"
        else:
            verify_error = ""
    if outcome == states.SUCCEEDED and kind == JobKind.RESTORE:
        try:
            _verify_restore(image, result)
        except (ImgfarmError, ProtocolError, KeyError, TypeError, ValueError) as exc:
            outcome, verify_error = states.FAILED, f"restore did not verify: {exc}"
    if info is not None and touched:
        cycle = outcome != states.SUCCEEDED or settings.power_cycle_after
        err = reset_node(info, power_cycle=cycle)
        if err:
            errors.append(err)
    with session_scope() as s:
        job = get_job(s, job_id)
        final, error = outcome, job.error
        if job.outcome == states.SUCCEEDED and outcome == states.FAILED and verify_error:
            error = verify_error
        if final == states.SUCCEEDED and verified is not None:
            try:
                _register_capture(s, job, verified)
            except (ImgfarmError, OSError) as exc:
                final, error = states.FAILED, f"capture could not be registered: {exc}"
        if outcome == states.SUCCEEDED and errors:
            final = states.FAILED
        if errors:
            error = "; ".join([e for e in [error, *errors] if e])
        ok = transition(
            s,
            job_id,
            states.FINALIZING,
            final,
            error or f"{kind} {final}",
            error=error,
            progress=100.0 if final == states.SUCCEEDED else job.progress,
        )
    if kind == JobKind.CAPTURE and final != states.SUCCEEDED and ok:
        shutil.rmtree(incoming_dir(job_id), ignore_errors=True)
    if ok and multicast.session_of(options):
        multicast.end_if_done(job_id, options)
