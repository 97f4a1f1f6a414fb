"""The site's one error root: every site error is a SiteError with a catalogued code.

Also checks, without raising them, that every code a site error is built with in the
source (``SomeError(..., code="...")``) is in the catalogue: a typo in a rarely taken
refusal path would otherwise surface as a ValueError in production.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import site_node
from site_node.errors import CATALOGUE, MessageRefusedError, SiteError
from site_node.federation.clientapp import FederationError
from site_node.federation.mods import GuardRefusalError
from site_node.federation.processes import BundleRefusedError

ROOT = Path(__file__).resolve().parents[3]


def _all_site_errors() -> list[type[SiteError]]:
    for module in pkgutil.walk_packages(site_node.__path__, prefix="site_node."):
        importlib.import_module(module.name)
    found: list[type[SiteError]] = []
    todo: list[type[SiteError]] = [SiteError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: f"{c.__module__}.{c.__qualname__}")


SITE_ERRORS = _all_site_errors()


def test_the_site_errors_of_every_module_are_found() -> None:
    names = {cls.__name__ for cls in SITE_ERRORS}
    assert {
        "AgentError",
        "ApprovalError",
        "BundleRefusedError",
        "FederationError",
        "GuardRefusalError",
        "KeyFileError",
        "ReleaseError",
        "RunnerUnavailableError",
        "WitnessRefusedError",
    } <= names


@pytest.mark.parametrize("cls", SITE_ERRORS, ids=lambda c: c.__name__)
def test_every_site_error_has_a_catalogued_default_code(cls: type[SiteError]) -> None:
    assert cls.__module__.startswith("site_node.")
    assert cls.code in CATALOGUE


@pytest.mark.parametrize("cls", SITE_ERRORS, ids=lambda c: c.__name__)
def test_every_site_error_takes_the_same_constructor(cls: type[SiteError]) -> None:
    assert inspect.signature(cls) == inspect.signature(SiteError)
    exc = cls("something went wrong")
    assert exc.message == "something went wrong"
    assert exc.code == cls.code
    assert exc.hint is None
    if issubclass(cls, MessageRefusedError):
        assert str(exc) == f"{cls.code}: something went wrong"
    else:
        assert str(exc) == "something went wrong"
    named = cls("refused", code="site.error", hint="do this")
    assert (named.message, named.code, named.hint) == ("refused", "site.error", "do this")


def test_an_unknown_code_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no\.such_code"):
        SiteError("x", code="no.such_code")
    with pytest.raises(ValueError, match="add it to CATALOGUE"):
        FederationError("x", code="contract.not_aproved")  # a typo
    with pytest.raises(ValueError, match="default of Uncatalogued"):
        type("Uncatalogued", (SiteError,), {"code": "no.such_code"})


def test_diagnostics_adds_the_hint() -> None:
    assert SiteError("it failed").diagnostics() == "it failed"
    exc = SiteError("it failed", code="agent.no_site_id", hint="Set CONCORD_SITE_SITE_ID.")
    assert exc.diagnostics() == "it failed\nHint: Set CONCORD_SITE_SITE_ID."


def test_refusals_in_error_replies_keep_their_codes() -> None:
    # The ServerApp records str(exc) (Flower's error reply reason); tests and audit entries
    # look for these exact codes.
    for cls, code in [
        (GuardRefusalError, "contract.not_approved"),
        (FederationError, "study.no_key"),
        (FederationError, "update.global_mismatch"),
        (BundleRefusedError, "bundle.not_allowed"),
    ]:
        assert str(cls("why", code=code)).startswith(f"{code}: ")


def test_the_catalogue_says_what_each_code_means() -> None:
    for code, meaning in CATALOGUE.items():
        assert code.count(".") == 1, code
        assert code == code.strip().lower(), code
        assert meaning.strip(), code
        assert "\n" not in meaning, code
        assert meaning.endswith("."), code


def _built_codes(paths: list[Path], names: set[str]) -> list[tuple[str, str]]:
    codes: list[tuple[str, str]] = []
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            if node.func.id not in names:
                continue
            for keyword in node.keywords:
                if keyword.arg == "code" and isinstance(keyword.value, ast.Constant):
                    codes.append((f"{path.relative_to(ROOT)}:{node.lineno}", keyword.value.value))
    return codes


def test_every_code_in_the_source_is_catalogued() -> None:
    paths = sorted((ROOT / "site_node").rglob("*.py")) + sorted(
        (ROOT / "benchmarks" / "apps").rglob("*.py")
    )
    codes = _built_codes(paths, {cls.__name__ for cls in SITE_ERRORS})
    assert len(codes) > 50  # the scan sees the raise sites
    assert [(where, code) for where, code in codes if code not in CATALOGUE] == []
