# Build the compiled core in one stage, run as a non-root user in a slim one.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev libsqlite3-dev zlib1g-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY fastrelay ./fastrelay
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 fastrelay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER fastrelay
WORKDIR /home/fastrelay
ENV FASTRELAY_DATA_DIR=/home/fastrelay/data
EXPOSE 6001
# SIGTERM drains (4200 to clients, audit flushed) within shutdown_timeout; give it that long
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:6001/up', timeout=2).status != 200)"
CMD ["fastrelay", "serve"]
