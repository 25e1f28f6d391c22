#!/bin/sh
# Make tests/data/legacy/sample-ext2.000 with the real partimage 0.6.9 (Debian
# bookworm), and sample-ext2.json describing what a restore must give.
#
# Needs root (loop devices, mount), partimage, e2fsprogs, python3.
# Usage: sh tests/data/legacy/make_sample.sh   (from anywhere)
#
# What it does:
#   1. a 12 MiB file, mkfs.ext2 with 1 KiB blocks, label "imgfarm-sample";
#   2. mounted on a loop device: hello.txt, numbers.txt (seq 1 20000),
#      random.bin (300000 bytes from /dev/urandom), sub/nested.txt;
#   3. `partimage -b -z1 -o -d -f3 -M save LOOP OUT/sample-ext2` (gzip, one
#      volume, no MBR backup since a loop device has no disk);
#   4. `partimage -b -f3 restore LOOP2 OUT/sample-ext2.000` onto a zero-filled
#      12 MiB loop device, and the sha256 of those 12 MiB go to the JSON with
#      the per-file sha256 (the reference for conversion tests).
set -eu
OUT=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d /tmp/mksample.XXXXXX)
SIZE=$((12 * 1024 * 1024))
L1=""; L2=""
cleanup() {
    umount "$W/mnt" 2>/dev/null || true
    [ -n "$L1" ] && losetup -d "$L1" 2>/dev/null || true
    [ -n "$L2" ] && losetup -d "$L2" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT INT TERM
export TERM="${TERM:-xterm}"

truncate -s "$SIZE" "$W/fs.img"
mkfs.ext2 -q -F -b 1024 -L imgfarm-sample "$W/fs.img"
mkdir "$W/mnt"
L1=$(losetup -f --show "$W/fs.img")
mount "$L1" "$W/mnt"
echo "hello from imgfarm" > "$W/mnt/hello.txt"
seq 1 20000 > "$W/mnt/numbers.txt"
head -c 300000 /dev/urandom > "$W/mnt/random.bin"
mkdir "$W/mnt/sub"
echo "nested file" > "$W/mnt/sub/nested.txt"
(cd "$W/mnt" && sha256sum hello.txt numbers.txt random.bin sub/nested.txt) > "$W/files.sha256"
umount "$W/mnt"

rm -f "$OUT/sample-ext2.000"
partimage -b -z1 -o -d -f3 -M save "$L1" "$OUT/sample-ext2" </dev/null >/dev/null 2>&1
chmod 644 "$OUT/sample-ext2.000"
losetup -d "$L1"; L1=""

truncate -s "$SIZE" "$W/restored.img"
L2=$(losetup -f --show "$W/restored.img")
partimage -b -f3 restore "$L2" "$OUT/sample-ext2.000" </dev/null >/dev/null 2>&1
losetup -d "$L2"; L2=""

python3 - "$W" "$OUT" "$SIZE" <<'PY'
import hashlib, json, sys
w, out, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = hashlib.sha256()
with open(f"{w}/restored.img", "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
files = []
for line in open(f"{w}/files.sha256"):
    digest, name = line.split(None, 1)
    files.append({"path": name.strip(), "sha256": digest})
doc = {
    "image": "sample-ext2.000",
    "made_by": "partimage 0.6.9 -z1 -M (gzip, one volume), see make_sample.sh",
    "filesystem": "ext2fs",
    "fs_block_size": 1024,
    "partition_size_bytes": size,
    "restored_sha256": h.hexdigest(),
    "files": files,
}
with open(f"{out}/sample-ext2.json", "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
PY
echo "wrote $OUT/sample-ext2.000 and $OUT/sample-ext2.json"
