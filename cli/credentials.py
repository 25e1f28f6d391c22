"""The operator's token for the CLI: from the environment or a 0600 file, never a flag.

Why never a flag: a command line is visible to every user of the machine (ps,
/proc/PID/cmdline) and lands in shell history. A token file that others can
read is refused for the same reason, naming the file and the fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from imgfarm.errors import InvalidInput

TOKEN_ENV = "IMGFARM_TOKEN"
TOKEN_FILE_ENV = "IMGFARM_TOKEN_FILE"
MAX_TOKEN_FILE = 4096


def default_token_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "imgfarm" / "token"


def operator_token() -> str:
    """IMGFARM_TOKEN, else the file IMGFARM_TOKEN_FILE names (default ~/.config/imgfarm/token),
    else ""."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    named = os.environ.get(TOKEN_FILE_ENV, "")
    path = Path(named) if named else default_token_file()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        if named:
            raise InvalidInput(f"{TOKEN_FILE_ENV}={named}: no such file",
                               hint="create it with `imgfarm token create NAME --scope S --file PATH`"
                               ) from None
        return ""
    except OSError as exc:
        raise InvalidInput(f"token file {path}: {exc.strerror}",
                           hint="a regular file of yours, mode 0600") from None
    return _read_open_private(fd, path, "token file", "it holds one token on one line").strip()


def _read_open_private(fd: int, path: Path, what: str, too_big_hint: str) -> str:
    """The text of an opened file, refused unless it is a small regular file others
    cannot read: one rule for token and credential files alike."""
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{what} {path} is not a regular file", hint="a file, mode 0600")
        if st.st_mode & 0o077:
            raise InvalidInput(
                f"{what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o})",
                hint=f"chmod 600 {path}")
        data = fh.read(MAX_TOKEN_FILE + 1)
    if len(data) > MAX_TOKEN_FILE:
        raise InvalidInput(f"{what} {path} is larger than {MAX_TOKEN_FILE} bytes", hint=too_big_hint)
    return data.decode("utf-8", "replace")


def read_private_file(named: str) -> str:
    """A credential file's text, refused unless it is a regular file others cannot read."""
    path = Path(named)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise InvalidInput(f"credential file {path}: {exc.strerror}",
                           hint="a regular file of yours, mode 0600") from None
    return _read_open_private(fd, path, "credential file", "it holds a few short lines")


def write_token_file(path: Path, token: str) -> None:
    """A new file, mode 0600 from its first byte (never a moment readable by others).

    A missing directory is made, mode 0700: the default token file's directory
    (~/.config/imgfarm) does not exist on a new machine."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise InvalidInput(f"--file {path}: {exc.strerror}",
                           hint="name a new file in a directory you may write to") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
