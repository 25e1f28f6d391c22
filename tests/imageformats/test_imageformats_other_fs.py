"""Conversion of the other file systems partimage 0.6.9 saves: NTFS, ReiserFS, XFS, FAT16.

Same rule as test_imageformats_tools: the converted image restored with stock
tools (``zstd -dc | partclone.restore -O``) onto a zero-filled target gives
exactly the bytes ``partimage restore`` of the original gives.  These prove
the block -> offset mapping (docs/formats.md A3: block i at i x block size) on
file systems whose used blocks are spread differently from ext (NTFS's MFT in
the middle, ReiserFS's 32 MiB journal, XFS's allocation groups, FAT16's
fixed root directory).  JFS is not here: partimage 0.6.9 fails to save a
file system made by today's mkfs.jfs, so no legacy JFS image can be made.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pi_helpers import PARTIMAGE_TESTS, Legacy, make_other_fs, partclone_restore_sha

from imgfarm.imageformats import convert_legacy, inspect, verify_image

pytestmark = PARTIMAGE_TESTS

# partimage's name for the file system -> (manifest filesystem, partclone fs in the header)
EXPECTED = {
    "ntfs": ("ntfs", "ntfs", "NTFS"),
    "reiserfs": ("reiserfs-3.6", "reiserfs", "REISERFS"),
    "xfs": ("xfs", "xfs", "XFS"),
    "fat16": ("fat16", "fat16", "FAT16"),
}


@pytest.mark.parametrize("fs", sorted(EXPECTED))
def test_other_fs_converts_byte_exact(fs: str, tmp_path: Path) -> None:
    legacy: Legacy = make_other_fs(tmp_path, fs)
    legacy_name, ng_fs, pc_fs = EXPECTED[fs]
    info = inspect(legacy.image)
    assert info.filesystem == legacy_name
    assert info.used_blocks > 0 and info.block_count * info.block_size <= legacy.size
    dest = tmp_path / "store"
    dest.mkdir()
    m = convert_legacy(legacy.image, dest).to_json()
    part = m["partitions"][0]
    assert (part["filesystem"], part["partclone_fs"]) == (ng_fs, pc_fs)
    assert part["used_bytes"] == info.used_blocks * info.block_size
    zst = dest / m["name"] / part["file"]
    assert partclone_restore_sha(zst, legacy.size, tmp_path) == legacy.reference_sha
    verify_image(dest / m["name"])
