"""imgfarm: a Celery task-queue imaging farm for PXE-booted clusters.

The parts live at the top of the source tree, as the design card lists them
(config/, models/, tasks/, worker/, plus drivers/, imageformats/, api/, cli/,
agent/): each folder X/ is the sub-package imgfarm.X through the symlink
imgfarm/X. Which part may import which: docs/architecture.md.
"""

__version__ = "0.1.0"
