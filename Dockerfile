# bil-transform: docker build -t bil-transform .
#   demo:  docker run --rm -p 8000:8000 -v bil-demo:/data bil-transform
#   data:  docker run --rm -p 8000:8000 -v /archive:/archive:ro bil-transform serve --host 0.0.0.0 /archive/brain1
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libopenjp2-7: glymur decodes JPEG2000 through the system OpenJPEG. Not version-pinned: Debian
# drops a package's old version from the archive at each security update; the base tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopenjp2-7 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bil_transform ./bil_transform
RUN pip install --no-cache-dir . \
    && rm -rf /app/build /app/*.egg-info

# A fixed numeric uid, so `USER` needs no passwd lookup and host volumes can be chowned to it.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/bil --shell /usr/sbin/nologin bil \
    && mkdir /data /cache \
    && chown bil:bil /data /cache
USER 10001:10001

# /data: the demo's generated volume (about 0.5 GB, made on first start); a named volume keeps it
# across containers. `serve` ignores it: mount your archive read-only instead. /cache: for
# `--disk-cache /cache`, the chunks kept across restarts (a named volume owned by bil).
VOLUME ["/data", "/cache"]
EXPOSE 8000

# The first demo start generates the data before listening, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["bil-transform"]
CMD ["demo", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
