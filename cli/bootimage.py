"""`imgfarm bootimage ...`: build the agent's boot image, install it where the boot files point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from imgfarm.cli.output import echo, handles_errors, human_bytes, json_option, print_json, say
from imgfarm.errors import ImgfarmError

app = typer.Typer(help="Build and install the agent's boot image (kernel + initrd).", no_args_is_help=True)

CACHE_HELP = "where built images are kept by the hash of their inputs (default: ~/.cache/imgfarm/bootimage)"


def _build(out: Path | None, kernel: str, compress: str, level: int, cache_dir: Path | None,
           no_cache: bool) -> Any:
    # lazy: the builder (subprocesses, hashing, compressors) loads only for these commands
    from imgfarm.bootimage.build import build

    return build(out, cache_dir=cache_dir, kernel_version=kernel, compression=compress, level=level,
                 use_cache=not no_cache)


def _report(image: Any, kernel_path: Path, initrd_path: Path, json_out: bool,
            extra: dict[str, Any] | None = None, more: tuple[str, ...] = ()) -> None:
    """What went in and the sizes against the budget; `extra` joins the JSON object, `more`
    follows the text."""
    m = image.manifest
    initrd, budget = m["initrd"], m["budget_bytes"]
    fits = initrd["bytes"] <= budget
    if json_out:
        print_json({"key": image.key, "cached": image.cached, "vmlinuz": str(kernel_path),
                    "initrd": str(initrd_path), "fits_budget": fits, **m, **(extra or {})})
    else:
        how = "from the cache" if image.cached else f"built in {m['build_seconds']} s"
        say(f"boot image {image.key[:12]} ({how})")
        say(f"  kernel  {m['kernel']['version']}, {human_bytes(m['kernel']['bytes'])}: {kernel_path}")
        say(f"  initrd  {human_bytes(initrd['bytes'])} {initrd['compression']} -{initrd['level']} "
            f"({human_bytes(initrd['cpio_bytes'])} unpacked, {initrd['entries']} entries): {initrd_path}")
        say(f"  python  {m['python']['version']} with {m['python']['stdlib_files']} stdlib files; "
            f"{len(m['modules'])} kernel modules asked for, with their dependencies")
        if m["modules_missing"]:
            say(f"  warning: modules not in this kernel: {', '.join(m['modules_missing'])}")
        say(f"  budget  initrd {human_bytes(initrd['bytes'])} of {human_bytes(budget)}: "
            f"{'ok' if fits else 'OVER'}")
        for line in more:
            echo(line)
    if not fits:
        raise ImgfarmError(f"the initrd is {human_bytes(initrd['bytes'])}, over the budget of "
                           f"{human_bytes(budget)}", hint="use --compress zstd with a higher --level")


@app.command("build")
@handles_errors
def build_cmd(
    out: Path = typer.Option(..., "--out", help="directory to write vmlinuz and initrd.img into"),
    kernel: str = typer.Option("", help="kernel version under /boot (default: the newest installed)"),
    compress: str = typer.Option("zstd", help="zstd or gzip (the kernel unpacks both)"),
    level: int = typer.Option(0, help="compression level (default: zstd 9, gzip 6)"),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help="build even if the cache has these inputs"),
    json_out: bool = json_option(),
) -> None:
    """Build the boot image from this host's Debian packages into --out (cached by its inputs)."""
    try:
        image = _build(out, kernel, compress, level, cache_dir, no_cache)
    except OSError as exc:
        raise ImgfarmError(f"cannot write the boot image: {exc.strerror or exc} ({exc.filename or out})",
                           hint="give an --out (and --cache-dir) this user may write to") from None
    _report(image, out / "vmlinuz", out / "initrd.img", json_out)


@app.command("install")
@handles_errors
def install_cmd(
    kernel: str = typer.Option("", help="kernel version under /boot (default: the newest installed)"),
    compress: str = typer.Option("zstd", help="zstd or gzip"),
    level: int = typer.Option(0, help="compression level (default: zstd 9, gzip 6)"),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    loaders: bool = typer.Option(True, "--loaders/--no-loaders",
                                 help="also put the network boot loaders the site's DHCP hands out "
                                      "(pxelinux.0, lpxelinux.0, ldlinux.c32, undionly.kpxe, ipxe.efi, "
                                      "boot.ipxe) into the TFTP root, from this host's Debian packages"),
    json_out: bool = json_option(),
) -> None:
    """Build (or take from the cache) the boot image and put it where the pxe driver's boot
    files point: IMGFARM_PXE__TFTP_ROOT / IMGFARM_PXE__KERNEL and IMGFARM_PXE__INITRD.

    With the loaders beside it, the TFTP root is then all a site's DHCP server needs to
    point at (README: "Your first real node" shows the DHCP lines)."""
    # lazy: the settings (pydantic) and the builder load only for this command
    from imgfarm.bootimage.build import copy_to
    from imgfarm.bootimage.loaders import install_loaders
    from imgfarm.config.settings import get_settings

    pxe = get_settings().pxe
    image = _build(None, kernel, compress, level, cache_dir, False)
    try:
        copy_to(image, pxe.tftp_root, pxe.kernel, pxe.initrd)
        placed = install_loaders(pxe.tftp_root) if loaders else []
    except OSError as exc:
        raise ImgfarmError(f"cannot install the boot image into {pxe.tftp_root}: {exc.strerror or exc}",
                           hint="run it as a user that may write there, or set IMGFARM_PXE__TFTP_ROOT") from None
    missing = sorted({p.package for p in placed if p.path is None})
    more = [f"  served over TFTP from {pxe.tftp_root}, and over HTTP by `imgfarm api` at /tftp/"]
    for p in placed:
        where = p.name if p.path else f"{p.name}: not installed (Debian package {p.package})"
        more.append(f"  loader  {where} -- {p.for_whom}")
    if missing:
        more.append(f"  to add the missing loaders: apt install {' '.join(missing)}, then run this again")
    extra = {"loaders": [{"name": p.name, "path": str(p.path) if p.path else None, "package": p.package,
                          "for": p.for_whom} for p in placed], "missing_packages": missing}
    _report(image, pxe.tftp_root / pxe.kernel, pxe.tftp_root / pxe.initrd, json_out, extra, tuple(more))
