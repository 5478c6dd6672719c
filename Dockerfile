# The project's image: the CLI, the GPU worker and the Faust pipeline.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LORALEDGER_HOME=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY kernels ./kernels
COPY inference ./inference
COPY pipeline ./pipeline
COPY loraledger ./loraledger
COPY infra ./infra
RUN pip install --prefer-binary .

# One directory per principal, owned by the service user with mode 0700: docker-compose mounts
# a volume on each, and a new volume takes over the directory's owner and mode.
RUN useradd --create-home --uid 10001 loraledger \
    && mkdir -p /data /credentials/client /credentials/worker /credentials/processor \
       /credentials/governance /credentials/sink \
    && chown -R loraledger /data /credentials && chmod 700 /credentials /credentials/*
USER loraledger
VOLUME ["/data"]
CMD ["loraledger", "--help"]
