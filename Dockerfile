# parley: a chat gateway for LLM agents.
# Slim Python base, a non-root user, state in a volume at /data.
#   docker build -t parley .
#   docker run -d --env-file .env -v parley-data:/data parley          # = parley run
#   docker run --rm --env-file .env -v parley-data:/data parley check
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY bots ./bots
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PARLEY_STORE=sqlite:////data/parley.db
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin parley \
    && mkdir -p /data /config \
    && chown parley:parley /data
USER parley
WORKDIR /data
VOLUME ["/data"]
# Optional: mount a parley.yaml at /config/parley.yaml and set PARLEY_CONFIG=/config/parley.yaml.
EXPOSE 9464
# Readiness from /readyz when the health server is on (PARLEY_METRICS__LISTEN), else trivially healthy:
# unhealthy while a platform keeps failing (health.unready_after) or the store is unreachable.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
  CMD python -c "import os,sys,urllib.request; a=os.environ.get('PARLEY_METRICS__LISTEN'); sys.exit(0) if not a else urllib.request.urlopen('http://'+a.replace('0.0.0.0','127.0.0.1')+'/readyz', timeout=4)"
# parley is PID 1 and handles SIGTERM itself: finish running replies, then exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["parley"]
CMD ["run"]
