"""Structured JSON logs on stderr, one object a line, with the `request_id` of the request being
answered when there is one (`service.tracing`). Secrets never reach a record: settings hold
them as SecretStr and the Redis URL is logged redacted."""
from __future__ import annotations

import json
import logging
import sys
import time

from .tracing import REQUEST_ID

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and the record's extras."""
    def format(self, r: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r.created))
               + f".{int(r.msecs):03d}Z", "level": r.levelname.lower(), "logger": r.name,
               "msg": r.getMessage()}
        rid = REQUEST_ID.get()
        if rid is not None:
            out["request_id"] = rid
        out.update({k: v for k, v in vars(r).items() if k not in _STD})
        if r.exc_info:
            out["error"] = self.formatException(r.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "info") -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
    for name in ("sine", "uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [h]
        lg.setLevel(level.upper())
        lg.propagate = False
