# mxsend as a container or sidecar: point it at a spool volume shared with the writer.
#   docker build -t mxsend .
#   docker run -v mxsend-spool:/var/spool/mxsend mxsend
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MXSEND_CONFIG=/etc/mxsend/mxsend.toml

WORKDIR /opt/mxsend
COPY pyproject.toml README.md ./
COPY mxsend ./mxsend
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10025 --home-dir /var/spool/mxsend --shell /usr/sbin/nologin mxsend \
    && mkdir -p /etc/mxsend /var/spool/mxsend \
    && chown mxsend:mxsend /var/spool/mxsend

# The shipped config with container paths: the spool is the volume, the script sits
# beside the config (mount your own over /etc/mxsend/mxout.lua).
COPY config/mxsend.toml config/mxout.lua /etc/mxsend/
RUN sed -i 's|^path = "../spool"|path = "/var/spool/mxsend"|' /etc/mxsend/mxsend.toml

USER mxsend
VOLUME ["/var/spool/mxsend"]
# Healthy while the daemon's heartbeat in the spool is fresh (it refreshes it every few
# seconds; see docs/operations.md).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["mxsend", "health"]
CMD ["mxsend", "run"]
