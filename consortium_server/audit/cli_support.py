"""CLI logic for ``consortium audit verify`` (no Typer here).

The CLI loads an export with :func:`load_export_file` (or fetches it from the API),
verifies it with :func:`concord_protocol.audit.verify.verify_export` and the keys the user
gave, and prints the result with :func:`concord_protocol.audit.render.render_report`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from concord_protocol.audit.export import AuditExport, load_export
from consortium_server.errors import InvalidRequestError

__all__ = ["load_export_file"]


def load_export_file(path: Path) -> AuditExport:
    """Load an export file; ``audit.export_invalid`` if it cannot be read as one."""
    try:
        return load_export(Path(path))
    except FileNotFoundError as exc:
        raise InvalidRequestError(f"No such file: {path}", code="audit.export_invalid") from exc
    except (ValidationError, UnicodeDecodeError, OSError, OverflowError) as exc:
        raise InvalidRequestError(
            f"{path} is not a Concord audit export: {exc}", code="audit.export_invalid"
        ) from exc
