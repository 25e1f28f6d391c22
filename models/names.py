"""Image names, checked the same way wherever one comes in (CLI, API, registry, store).

A name is also a directory in the image store, so the rule is strict: no `/`,
no `..`, nothing that could point outside the store. This module imports no
database code, so `imgfarm image convert --out DIR` can check a name without
loading SQLAlchemy.
"""

from __future__ import annotations

import re

from imgfarm.errors import InvalidInput

IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def check_image_name(name: str) -> str:
    if not IMAGE_NAME_RE.match(name or "") or ".." in name:
        raise InvalidInput(
            f"bad image name {name!r}",
            hint="use letters, digits, '.', '_', '+' and '-' (no '/', no '..'), at most 128",
        )
    return name
