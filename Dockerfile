# syntax=docker/dockerfile:1
# loopd's container image: the package as a wheel with the `fast` extra (uvloop), the
# shipped packs and example rules, a non-root user with a fixed uid, and writable state
# only under the volume /var/lib/loopd (the root filesystem may be mounted read-only).
#
#   docker build -t loopd:0.1.0 .
#   docker run --read-only -v loopd-state:/var/lib/loopd \
#     -v "$PWD/tokens:/etc/loopd/tokens:ro" -p 8080:8080 loopd:0.1.0
#
# LOOPD_VERSION must equal pyproject.toml's version (tests/integration/test_image.py).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- builder: the loopd wheel and the wheels of everything it needs ---
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY loopd ./loopd
RUN pip wheel --wheel-dir /wheels '.[fast]'

# --- runtime: installs those wheels only (no compiler, no source tree) ---
FROM ${PYTHON_IMAGE} AS runtime
ARG LOOPD_VERSION=0.1.0
ARG LOOPD_UID=10001
LABEL org.opencontainers.image.title="loopd" \
      org.opencontainers.image.description="Event-driven closed-loop remediation daemon" \
      org.opencontainers.image.version="${LOOPD_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="loopd" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/var/lib/loopd

RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "loopd[fast]==${LOOPD_VERSION}" \
    && groupadd --system --gid "${LOOPD_UID}" loopd \
    && useradd --system --uid "${LOOPD_UID}" --gid "${LOOPD_UID}" --no-create-home \
       --home-dir /var/lib/loopd --shell /usr/sbin/nologin loopd \
    && install -d -o "${LOOPD_UID}" -g "${LOOPD_UID}" -m 0750 /var/lib/loopd

# read-only content, owned by root: the daemon user cannot change its own rules or packs
COPY packs /opt/loopd/packs
COPY rules /opt/loopd/rules
COPY config/container.yaml /opt/loopd/config/loopd.yaml

# the one writable path: the SQLite store (single node); several replicas use Postgres
VOLUME ["/var/lib/loopd"]
WORKDIR /var/lib/loopd
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["loopd", "run"]
CMD ["-c", "/opt/loopd/config/loopd.yaml"]
