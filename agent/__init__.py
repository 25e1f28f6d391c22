"""The node agent (`imgfarm-agent`): stdlib only, runs in the node's stateless image.

It imports nothing from the farm: no Celery, no SQLAlchemy. Its orders come
from the kernel command line; it talks to the farm's HTTP API with the job's
one-time token, and runs partclone/zstd or partimage against the disk.
"""
