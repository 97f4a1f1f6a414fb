"""The server's one error root: every DomainError has a catalogued code and the same
constructor as every Concord error, ``SomeError(message, *, code=..., details=...)``.

Also checks, without raising them, that every code a server error is built with in the
source (``SomeError(..., code="...")``) is in the catalogue: a typo in a rarely taken path
would otherwise be a 500 instead of the 4xx it means.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import consortium_server
from concord_protocol.errors import ConcordError
from consortium_server.errors import CATALOGUE, DomainError, NotFoundError

ROOT = Path(__file__).resolve().parents[3]


def _all_domain_errors() -> list[type[DomainError]]:
    for module in pkgutil.walk_packages(consortium_server.__path__, prefix="consortium_server."):
        if ".migrations" not in module.name:
            importlib.import_module(module.name)
    found: list[type[DomainError]] = []
    todo: list[type[DomainError]] = [DomainError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: f"{c.__module__}.{c.__qualname__}")


DOMAIN_ERRORS = _all_domain_errors()


@pytest.mark.parametrize("cls", DOMAIN_ERRORS, ids=lambda c: c.__qualname__)
def test_every_domain_error_has_a_catalogued_code_and_the_one_constructor(
    cls: type[DomainError],
) -> None:
    assert cls.code in CATALOGUE
    error = cls("Something specific went wrong.")
    assert isinstance(error, ConcordError)
    assert (error.code, error.message, str(error)) == (
        cls.code,
        "Something specific went wrong.",
        "Something specific went wrong.",
    )
    assert error.status == CATALOGUE[cls.code].status
    assert cls().public_message() == CATALOGUE[cls.code].title  # no message: the title


def test_a_code_may_be_named_and_must_be_in_the_catalogue() -> None:
    error = NotFoundError("No such study.", code="study.not_found", details=[{"id": "x"}])
    assert (error.code, error.status, error.details) == ("study.not_found", 404, [{"id": "x"}])
    with pytest.raises(ValueError, match="add it to CATALOGUE"):
        NotFoundError("x", code="study.nope")


def _codes_in_source() -> list[tuple[str, str]]:
    found = []
    for path in sorted((ROOT / "consortium_server").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for keyword in node.keywords:
                value = keyword.value
                if (
                    keyword.arg == "code"
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                ):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", value.value))
    return found


def test_every_code_in_the_source_is_catalogued() -> None:
    codes = _codes_in_source()
    assert len(codes) > 50
    unknown = [(where, code) for where, code in codes if code not in CATALOGUE]
    assert unknown == []
