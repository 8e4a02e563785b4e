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
# A token wherever a log line may quote one: a /token/TOKEN/ path segment (anywhere: aiohttp's
# parser quotes the raw request line, escaped), an Authorization header's value (its scheme
# kept), a token= query parameter. What follows is hidden up to the next separator, escapes included.
SECRETS = re.compile(r"(?P<keep>/token/|\b(?:access_)?token=|(?i:authorization)['\"]?\s*[:=,]\s*['\"]?"
                     r"(?:(?i:bearer|basic|token|digest)\s+)?|\b(?i:bearer|basic)\s+)[^/\s'\",&;?#]+")
# Where aiohttp's parser quotes the raw request (b'...', bytearray(b'...')): a header it cannot
# read may be a token with no name or scheme before it, so none of those bytes are logged.
REQUEST_BYTES = re.compile(r"(?:bytearray\()?b['\"]")


def shown_path(path: str) -> str:
    """A request path as logs and messages show it: never with its token."""
    return TOKEN_IN_PATH.sub("/token/***", path)


def redact(text: str) -> str:
    """`text` with every token it may quote replaced by ***."""
    return SECRETS.sub(lambda m: m["keep"] + "***", text)


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
        status = 499 if request.get("client_left") else response.status  # nginx's code for a client that left
        fields = {"remote": request.remote or "-", "method": request.method, "path": _printable(target, 2000),
                  "status": status, "bytes": response.body_length, "duration": round(duration, 6)}
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
        self.logger.info('%s - - [%s] "%s %s HTTP/%d.%d" %d %d %.4f', fields["remote"], stamp, request.method,
                         fields["path"], *request.version, status, response.body_length, duration,
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
        said = " ".join(REQUEST_BYTES.split(str(exc.message), maxsplit=1)[0].split()).rstrip(":")
        record.msg, record.args = "malformed request from %s: %s (its bytes are not logged)%s", (
            remote, _printable(f"{exc.code} {said}"),
            f" ({suppressed} more since the last such line)" if suppressed else "")
        record.exc_info = record.exc_text = None
        return True


class Redact(logging.Filter):
    """Tokens never reach the log: every line (aiohttp's own, tracebacks included) is rewritten
    with redact() before it is formatted. Installed on every handler configure() makes."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: logging reports that itself
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and isinstance(fields.get("path"), str):
            record.fields = {**fields, "path": redact(fields["path"])}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; access lines carry their fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            doc["traceback"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(doc)


ACCESS = logging.getLogger("bil_transform.access")


def configure(log_format: str = "text") -> None:
    """Everything to stderr in one format (access lines bare in text, as web servers write them);
    aiohttp's parse errors through ClientErrors; tokens redacted from every line (Redact)."""
    def handler(text_format: str) -> logging.Handler:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(text_format))
        h.addFilter(Redact())
        return h

    root = logging.getLogger()
    root.handlers[:] = [handler("%(levelname)s %(name)s: %(message)s")]
    root.setLevel(logging.INFO)
    ACCESS.handlers[:], ACCESS.propagate = [handler("%(message)s")], False
    logging.getLogger("aiohttp.server").addFilter(ClientErrors())
