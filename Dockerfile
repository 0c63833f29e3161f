# mxsend as a container or sidecar (docs/operations.md, "Containers"; docs/compose.yaml):
#   docker build -t mxsend .
#   docker run --stop-timeout 45 -v mxsend-spool:/var/spool/mxsend mxsend
# Dependencies come from requirements.lock and requirements-build.lock (scripts/lock),
# pinned with hashes. Give `docker stop` / compose's stop_grace_period more time than
# queue.shutdown_grace (30s by default): 45s, as the systemd unit does.

# --- build: the mxsend wheel, with the pinned build backend --------------------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements-build.lock ./
RUN pip install --no-cache-dir --require-hashes --requirement requirements-build.lock
COPY pyproject.toml README.md ./
COPY mxsend ./mxsend
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

# --- the image -----------------------------------------------------------------------------
FROM python:3.11-slim-bookworm

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mxsend" \
      org.opencontainers.image.description="Direct-MX outbound mail daemon with a VPOP3-compatible Lua delivery policy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.documentation="https://github.com/mxsend/mxsend/blob/main/docs/operations.md" \
      org.opencontainers.image.source="https://github.com/mxsend/mxsend"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MXSEND_CONFIG=/etc/mxsend/mxsend.toml

# The pinned dependencies first (a layer that changes only with the lock), then mxsend.
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --require-hashes --requirement /tmp/requirements.lock \
    && rm /tmp/requirements.lock
# Then mxsend itself, the wheel of the build stage; `sendmail` for an application in this
# container (contract §10); a fixed, numeric uid and gid, so that a writer sharing the
# spool volume can be given the same group (docs/operations.md, "Containers").
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps --no-index /tmp/wheels/mxsend-*.whl \
    && rm -r /tmp/wheels \
    && ln -s /usr/local/bin/mxsend /usr/sbin/sendmail \
    && groupadd --system --gid 10025 mxsend \
    && useradd --system --uid 10025 --gid 10025 --home-dir /var/spool/mxsend \
               --shell /usr/sbin/nologin mxsend \
    && install -d -o 10025 -g 10025 -m 0750 /var/spool/mxsend

# The shipped config with container paths: the spool is the volume, the script sits
# beside the config (mount your own over /etc/mxsend/mxout.lua).
COPY config/mxsend.toml config/mxout.lua /etc/mxsend/
RUN sed -i 's|^path = "../spool"|path = "/var/spool/mxsend"|' /etc/mxsend/mxsend.toml

USER 10025:10025
VOLUME ["/var/spool/mxsend"]
# SIGTERM: stop taking work, finish in-flight transactions within queue.shutdown_grace.
STOPSIGNAL SIGTERM
# Healthy while the daemon's heartbeat in the spool is fresh (it refreshes it every few
# seconds; see docs/operations.md).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["mxsend", "health"]
CMD ["mxsend", "run"]
