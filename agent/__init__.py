"""The node agent (`imgfarm-agent`): stdlib only, runs in the node's stateless image.

Of the farm it imports only `imgfarm.protocol`, the stdlib-only contract
that defines its orders (the kernel command line), the job spec, its reports
and the image manifest: no Celery, no SQLAlchemy. It talks to the farm's HTTP
API with the job's one-time token, and runs partclone/zstd or partimage
against the disk.
"""
