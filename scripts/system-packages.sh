#!/usr/bin/env bash
# Install the Debian packages imgfarm's tools and tests use, when root and missing.
set -euo pipefail
PKGS=(partimage partclone zstd redis-server postgresql dosfstools mtools ipmitool openipmi
      ntfs-3g reiserfsprogs xfsprogs
      tftpd-hpa tftp-hpa grub-common fdisk util-linux e2fsprogs python3-venv python3-pip
      gzip bzip2 xz-utils lzop pigz pbzip2 cpio iproute2 udpcast
      qemu-system-x86 qemu-utils ipxe-qemu linux-image-amd64 busybox-static
      pxelinux syslinux-common ipxe nfs-ganesha nfs-ganesha-vfs ovmf grub-efi-amd64-bin)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "imgfarm: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
  exit 0
fi
echo "imgfarm: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Do not let package scripts start services we start ourselves.
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
