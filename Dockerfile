# zk-cache-sidecar image: a builder stage makes wheels, the final stage installs
# only those into a virtual environment and runs as a fixed non-root user.
#
#   docker build -t zk-cache-sidecar:0.1.0 .
#
# The final image writes nothing outside /tmp and the /data volume, so it runs
# with a read-only root filesystem. tests/test_image.py runs this file's two
# pip command lines outside Docker, so the install step cannot silently rot.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY sidecar/ sidecar/
COPY cli/ cli/
# The project and every runtime dependency as wheels; nothing else reaches the final stage.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[speed]"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG UID=10001
LABEL org.opencontainers.image.title="zk-cache-sidecar" \
      org.opencontainers.image.description="Coherent local cache sidecar coordinated through Apache ZooKeeper" \
      org.opencontainers.image.source="https://github.com/zk-cache-sidecar/zk-cache-sidecar" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/zkcache/bin:$PATH \
    ZKCACHE_OPS_LISTEN=0.0.0.0:7071
RUN groupadd --gid "${UID}" zkcache \
 && useradd --uid "${UID}" --gid "${UID}" --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin zkcache \
 && mkdir /data \
 && chown "${UID}:${UID}" /data
# --no-index: only the wheels built above; the version pin makes a stale wheel fail loudly.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/zkcache \
 && /opt/zkcache/bin/pip install --no-cache-dir --no-index --find-links /wheels "zk-cache-sidecar[speed]==${VERSION}"
# The SQLite default (sqlite:///./zkcache.db) lands on the volume.
WORKDIR /data
VOLUME ["/data"]
# 7071: probes and metrics (no data). The API stays on 127.0.0.1:7070, reachable only inside the pod.
EXPOSE 7071
USER ${UID}:${UID}
ENTRYPOINT ["cache-sidecar"]
