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

RUN useradd --create-home --uid 10001 loraledger && mkdir -p /data && chown loraledger /data
USER loraledger
VOLUME ["/data"]
CMD ["loraledger", "--help"]
