"""The agent's boot image: a kernel and one initramfs holding the agent and its tools.

`imgfarm bootimage build` makes it from the build host's installed Debian
packages (build.py), `imgfarm bootimage install` puts it where the pxe
driver's boot files point. What is inside and how a node boots it:
docs/bootimage.md.
"""
