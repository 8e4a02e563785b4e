"""What the server writes to its log: one access line per request (tokens never written), real
faults with their tracebacks, and client mistakes as short, rate-limited lines without them."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time

from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import BaseRequest, StreamResponse

FORMATS = ("text", "json")
TOKEN_IN_PATH = re.compile(r"^/token/[^/]+")


def shown_path(path: str) -> str:
    """A request path as logs and messages show it: never with its token."""
    return TOKEN_IN_PATH.sub("/token/***", path)


def _printable(text: str, limit: int = 200) -> str:
    """Hostile bytes stay out of the log: control characters escaped, length capped."""
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


class AccessLogger(AbstractAccessLogger):
    """Apache's combined format without referer and agent, plus the duration in seconds:
    `127.0.0.1 - - [24/Nov/2026:16:00:00 +0000] "GET /ds/demo/zarr/.zattrs HTTP/1.1" 200 512 0.0012`.
    With --log-format json, the same fields as one JSON object per line."""

    def log(self, request: BaseRequest, response: StreamResponse, duration: float) -> None:
        target = shown_path(request.path) + (f"?{request.query_string}" if request.query_string else "")
        fields = {"remote": request.remote or "-", "method": request.method, "path": _printable(target, 2000),
                  "status": response.status, "bytes": response.body_length, "duration": round(duration, 6)}
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
        self.logger.info('%s - - [%s] "%s %s HTTP/%d.%d" %d %d %.4f', fields["remote"], stamp, request.method,
                         fields["path"], *request.version, response.status, response.body_length, duration,
                         extra={"fields": fields})


class ClientErrors(logging.Filter):
    """aiohttp logs every request it cannot parse (a malformed request line, an oversized header)
    as an ERROR with a traceback: 19,655 such lines for one fuzz run. They are the client's
    mistake: one WARNING line each, at most `per_minute` a minute, then a count of the rest."""

    def __init__(self, per_minute: int = 20):
        super().__init__()
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._window, self._shown, self._suppressed = 0.0, 0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        with self._lock:
            now = time.monotonic()
            if now - self._window >= 60:
                self._window, self._shown = now, 0
            if self._shown >= self.per_minute:
                self._suppressed += 1
                return False
            self._shown += 1
            suppressed, self._suppressed = self._suppressed, 0
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "malformed request from %s: %s%s", (
            remote, _printable(f"{exc.code} {exc.message}"),
            f" ({suppressed} more since the last such line)" if suppressed else "")
        record.exc_info = record.exc_text = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; access lines carry their fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc)


ACCESS = logging.getLogger("bil_transform.access")


def configure(log_format: str = "text") -> None:
    """Everything to stderr in one format (access lines bare in text, as web servers write them);
    aiohttp's parse errors through ClientErrors."""
    def handler(text_format: str) -> logging.Handler:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(text_format))
        return h

    root = logging.getLogger()
    root.handlers[:] = [handler("%(levelname)s %(name)s: %(message)s")]
    root.setLevel(logging.INFO)
    ACCESS.handlers[:], ACCESS.propagate = [handler("%(message)s")], False
    logging.getLogger("aiohttp.server").addFilter(ClientErrors())
