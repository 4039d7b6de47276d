# The proxy's image: installed from the wheel the tests install (built by the first stage from the same
# sources tests/test_package.py builds it from), with the cl100k_base tokenizer file, run as a non-root user.

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY sql ./sql
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/quota_sidecar-*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin quota
# tiktoken's cl100k_base (the copy LiteLLM ships; proxy/tokens.py checks its sha256). Without it prompts are
# counted at one token per byte, which no BPE exceeds but which overestimates about fourfold.
COPY deploy/tokenizer/cl100k_base.tiktoken /usr/local/share/quota-sidecar/cl100k_base.tiktoken
WORKDIR /app
ENV PROXY_HOST=0.0.0.0 PROXY_PORT=8080 PYTHONUNBUFFERED=1 \
    TOKENIZER_FILE=/usr/local/share/quota-sidecar/cl100k_base.tiktoken
# Numeric, so an orchestrator's runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PROXY_PORT', '8080') + '/healthz', timeout=3)"]
CMD ["sh", "-c", "quota-sidecar migrate && exec quota-sidecar serve"]
