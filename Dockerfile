# edgellm, CPU image: serves GGUF models, GGUF embeddings and GGUF reranking (no torch unless EXTRAS includes rerank).
# Build:  docker build -t edgellm:cpu .            (--build-arg EXTRAS=serve,rerank: the sentence-transformers reranker)
# Run:    docker compose up                          (models/ is mounted read-only)
# The image runs the same install steps as `make install`.

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake make git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY edgellm ./edgellm
COPY serve ./serve
COPY convert ./convert
COPY train ./train
COPY bench ./bench
COPY configs ./configs
COPY models/catalog.yaml models/README.md ./models/
ARG EXTRAS=serve
RUN make install VENV=/opt/venv EXTRAS=${EXTRAS} PYTHON=python3 \
 && rm -rf /root/.cache

FROM python:3.11-slim-bookworm AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin edgellm
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    EDGELLM_SERVE__HOST=0.0.0.0 \
    EDGELLM_SERVE__PORT=8000
USER edgellm
EXPOSE 8000
VOLUME ["/app/models"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
CMD ["edgellm", "serve", "--config", "configs/serve.yaml"]
