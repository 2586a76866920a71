FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine engine
COPY lua lua
COPY webapp webapp
COPY worker worker
COPY migrations migrations
RUN pip install --no-cache-dir . && useradd --system credit-engine
USER credit-engine
ENTRYPOINT ["credit-engine"]
