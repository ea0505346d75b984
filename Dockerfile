# quota-sidecar: the gRPC service in a slim Python image, running as a
# non-root user with its SQLite ledger on the /data volume, or on a PostgreSQL
# database (--ledger postgresql://..., deploy/compose.postgres.yaml).

FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY api/ api/
COPY server/ server/
COPY client/ client/

# The image runs the sidecar, so the wheel goes in with its `server` extra.
# The venv is created at the path it keeps in the final stage, so its
# interpreter link and script shebangs stay valid after the copy. The postgres
# extra (psycopg's binary wheels, libpq included) makes one image serve both
# ledgers.
RUN python -m venv /opt/quota-sidecar \
    && /opt/quota-sidecar/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && set -- /wheels/quota_sidecar-*.whl \
    && /opt/quota-sidecar/bin/pip install --no-cache-dir "$1[server,postgres]"


FROM python:3.11-slim

LABEL org.opencontainers.image.title="quota-sidecar" \
      org.opencontainers.image.description="gRPC sidecar that enforces and meters contact quotas" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 quota \
    && useradd --system --uid 10001 --gid quota --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin quota \
    && mkdir /data \
    && chown quota:quota /data

COPY --from=builder /opt/quota-sidecar /opt/quota-sidecar

ENV PATH=/opt/quota-sidecar/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    QUOTA_ADDRESS=0.0.0.0:50051 \
    QUOTA_METRICS_ADDRESS=0.0.0.0:9464 \
    QUOTA_LEDGER=sqlite:////data/quota-ledger.db

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50051 9464

# The probe reads QUOTA_ADDRESS and probes a 0.0.0.0 / [::] bind on loopback.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-m", "quota_sidecar.server.probe"]

ENTRYPOINT ["quota-sidecar"]
CMD ["serve"]
