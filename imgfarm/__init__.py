"""imgfarm: a Celery task-queue imaging farm for PXE-booted clusters.

The parts live at the top of the source tree, as the design card lists them
(config/, models/, tasks/, worker/, plus agent/, api/, cli/, imageformats/),
and install as sub-packages of this one namespace.
"""

__version__ = "0.1.0"
