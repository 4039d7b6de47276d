FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY sql ./sql
RUN pip install --no-cache-dir -e .
ENV PROXY_HOST=0.0.0.0 PROXY_PORT=8080
EXPOSE 8080
CMD ["sh", "-c", "python -m proxy migrate && exec python -m proxy serve"]
