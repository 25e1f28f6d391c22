# One image for every imgfarm service (api, job worker, convert worker, beat, flower);
# docker-compose.yml picks the role with the command.
#
# bookworm pinned: it still ships partimage 0.6.9 (legacy images are read by the
# converter and restored by the agent); partclone and zstd are the current format's tools.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    IMGFARM_DATA_DIR=/var/lib/imgfarm \
    IMGFARM_IMAGE_STORE=/srv/imgfarm/images

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
         partimage partclone zstd ipmitool nfs-common e2fsprogs util-linux \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . /src
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/imgfarm imgfarm \
    && mkdir -p /var/lib/imgfarm /srv/imgfarm/images \
    && chown -R imgfarm /var/lib/imgfarm /srv/imgfarm

# The services need no root; the job worker talks to BMCs and writes boot files only.
USER imgfarm
WORKDIR /var/lib/imgfarm
EXPOSE 8470 5555
ENTRYPOINT ["imgfarm"]
CMD ["--help"]
