"""GET /tftp/PATH: the pxe driver's TFTP root over HTTP, read-only.

iPXE fetches the kernel and the initrd (tens of MiB) over HTTP far faster
and more reliably than over TFTP, and a site's iPXE boot files name them by
`IMGFARM_PXE__IPXE_BASE_URL` (for example `http://FARM:8470/tftp/`). The
files are the same ones TFTP serves to anyone on the install network, so no
token is asked for, as TFTP asks none. Only regular files inside the root
are served: no listing, no `..`, no symlink out of the root.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from imgfarm.config.settings import get_settings
from imgfarm.errors import InvalidInput, NotFound

router = APIRouter(tags=["boot"])
MAX_PATH = 1024


def boot_file(root: Path, path: str) -> Path:
    """The file `path` names under `root`, or NotFound/InvalidInput; never a file outside it."""
    if len(path) > MAX_PATH or "\0" in path:
        raise InvalidInput("boot file path is too long or not text")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise NotFound(f"no boot file {path[:200]!r}")
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(real_root.joinpath(*parts)))
    if not target.is_relative_to(real_root) or not target.is_file():
        raise NotFound(f"no boot file {path[:200]!r} under the TFTP root")
    return target


@router.get("/tftp/{path:path}", response_class=FileResponse, operation_id="get_boot_file")
@router.head("/tftp/{path:path}", response_class=FileResponse, operation_id="head_boot_file")
def get_boot_file(path: str) -> FileResponse:
    target = boot_file(get_settings().pxe.tftp_root, path)
    return FileResponse(target, media_type="application/octet-stream")
