"""Application logging: structured JSON lines with the request id.

The application log is for operators; the compliance audit log is a separate stream
(``consortium_server.audit``). Never log patient data, tensors, tokens or key material.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from concord_protocol.logs import JsonFormatter

__all__ = ["configure_logging", "request_id_var"]

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


class RequestJsonFormatter(JsonFormatter):
    """JSON lines with the id of the request being served, when there is one."""

    def context(self) -> dict[str, object]:
        request_id = request_id_var.get()
        return {"request_id": request_id} if request_id else {}


def configure_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    """Send the ``concord`` loggers (and uvicorn's) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        RequestJsonFormatter()
        if json_lines
        else logging.Formatter("%(levelname)s %(name)s %(message)s")
    )
    for name in ("concord", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True
