"""Image formats: legacy partimage 0.6.x (read), partclone 0002 (read/write), partimage-ng.

See docs/formats.md for the byte layouts.
"""

from imgfarm.imageformats.convert import convert_legacy
from imgfarm.imageformats.ng import read_manifest, validate_manifest, verify_image, write_manifest
from imgfarm.imageformats.partimage import PartimageReader, inspect

__all__ = [
    "PartimageReader",
    "convert_legacy",
    "inspect",
    "read_manifest",
    "validate_manifest",
    "verify_image",
    "write_manifest",
]
