"""`imgfarm-agent --self-check`: is every tool the agent runs here, and which version.

The boot image is built from the build host's packages; this is how a site
(and the boot image's own test) sees on the node's console that nothing the
jobs need was left out, before the first job finds out the hard way.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from imgfarm.agent.disks import PARTCLONE_TOOL

# tool -> the arguments that make it print its version (stdout or stderr).
REQUIRED: dict[str, list[str]] = {
    **{f"partclone.{suffix}": ["--version"] for suffix, _ in sorted(set(PARTCLONE_TOOL.values()))},
    "partclone.dd": ["--version"],
    "partclone.restore": ["--version"],
    "partimage": ["--version"],
    "zstd": ["-V"],
    "sfdisk": ["--version"],
    "blkid": ["--version"],
    "blockdev": ["--version"],
    "losetup": ["--version"],
    "lsblk": ["--version"],
    "dd": ["--version"],
    "mount": [],
    "umount": [],
}
# Present in the image for a person at the debug shell; not run by the agent.
OPTIONAL: dict[str, list[str]] = {
    "mke2fs": ["-V"],
    "e2fsck": ["-V"],
    "mkfs.fat": ["--help"],
    "fatlabel": ["--version"],
    "ntfs-3g": ["--version"],
    "ntfsclone": ["--version"],
    "busybox": [],
    "modprobe": ["--version"],
}


def _version(path: str, args: list[str]) -> str:
    if not args:
        return ""
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(cannot run: {exc})"
    for text in (out.stdout, out.stderr):
        for line in text.splitlines():
            line = line.strip(" *")
            if line and not line.lower().startswith("usage"):
                return line[:100]
    return ""


def self_check() -> int:
    """Print every tool with its path and version; 1 if a required one is missing."""
    print("imgfarm-agent self-check", flush=True)
    print(f"  python {sys.version.split()[0]} ({sys.executable})", flush=True)
    missing = []
    for table, required in ((REQUIRED, True), (OPTIONAL, False)):
        for tool, args in table.items():
            path = shutil.which(tool)
            if path is None:
                print(f"  {tool}: MISSING{'' if required else ' (optional)'}", flush=True)
                if required:
                    missing.append(tool)
                continue
            version = _version(path, args)
            print(f"  {tool}: {path}{' ' + version if version else ''}", flush=True)
    if missing:
        print(f"self-check: FAILED, missing {', '.join(missing)}", flush=True)
        return 1
    print(f"self-check: ok, {len(REQUIRED)} tools", flush=True)
    return 0
