"""Image names, checked the same way wherever one comes in (CLI, API, registry, store).

A name is also a directory in the image store, so the rule is strict: no `/`,
no `..`, nothing that could point outside the store. This module imports no
database code, so `imgfarm image convert --out DIR` can check a name without
loading SQLAlchemy.
"""

from __future__ import annotations

import re

from imgfarm.errors import InvalidInput
from imgfarm.protocol import IMAGE_NAME, IMAGE_NAME_HINT


def check_image_name(name: str) -> str:
    """The protocol's one image-name rule (the converter and the agent check the same), as the
    operator's error."""
    if not IMAGE_NAME.match(name or ""):
        raise InvalidInput(f"bad image name {name!r}", hint=IMAGE_NAME_HINT)
    return name


def converted_name(source: str) -> str:
    """The default name of the image converted from the legacy image `source`."""
    return f"{source}-ng"


# A driver setting whose name ends in pass, passwd, password, secret, token or key (any
# case, `_file` settings excepted: those name a file) is a secret. The drivers' own
# `secret` marks must agree (tests/test_secrets.py checks every declared property).
_SECRET_KEY = re.compile(r"(?:^|[_.-])(?:pass|passwd|password|secret|token|key)\Z", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))
