"""Rendering the Helm charts offline (helm-python-sdk) and reading the manifests back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHARTS = REPO / "deploy" / "helm"
VALUES = Path(__file__).with_name("values")
SERVER_CHART = CHARTS / "consortium-server"
SITE_CHART = CHARTS / "site-node"
CHART_OF = {"server": SERVER_CHART, "site": SITE_CHART}
VALID_VALUES = {
    "server": ["server-minimal.yaml", "server-production.yaml"],
    "site": ["site-minimal.yaml", "site-production.yaml"],
}
INVALID_VALUES = {
    "server": [
        "server-invalid-typo.yaml",
        "server-invalid-type.yaml",
        "server-invalid-missing.yaml",
    ],
    "site": ["site-invalid-typo.yaml", "site-invalid-type.yaml", "site-invalid-missing.yaml"],
}
RELEASE = {"server": "concord", "site": "hospital"}
NAMESPACE = "concord"


def load_values(name: str) -> dict[str, Any]:
    """A values file from tests/deploy/values."""
    data = yaml.safe_load((VALUES / name).read_text())
    assert isinstance(data, dict)
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base`` (as Helm merges -f files)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Rendered:
    """One chart rendered with one set of values."""

    templates: dict[str, str]

    @property
    def notes(self) -> str:
        return next(text for path, text in self.templates.items() if path.endswith("NOTES.txt"))

    def docs(self) -> list[dict[str, Any]]:
        """Every Kubernetes object rendered (NOTES and empty templates left out)."""
        out: list[dict[str, Any]] = []
        for path, text in sorted(self.templates.items()):
            if path.endswith(".txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    out.append(doc)
        return out

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs())

    def get(self, kind: str, suffix: str = "") -> dict[str, Any]:
        """The one object of ``kind`` whose name ends with ``suffix``."""
        found = [
            d for d in self.docs() if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)
        ]
        assert len(found) == 1, (
            f"{len(found)} {kind} named *{suffix}: {[d['metadata']['name'] for d in found]}"
        )
        return found[0]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs() if d["kind"] == kind]


def render(chart: str, values: dict[str, Any], *, release: str | None = None) -> Rendered:
    """Render ``chart`` (``server`` or ``site``) as ``helm install`` would (no cluster)."""
    loaded = helm_python.Chart.load(str(CHART_OF[chart]))
    templates = loaded.render(
        values, name=release or RELEASE[chart], namespace=NAMESPACE, revision=1, is_install=True
    )
    return Rendered(templates)


def pod_specs(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    """(object name, pod spec) of every workload (Deployments, Jobs, bare Pods)."""
    out = []
    for doc in rendered.docs():
        if doc["kind"] in ("Deployment", "Job"):
            out.append((doc["metadata"]["name"], doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "Pod":
            out.append((doc["metadata"]["name"], doc["spec"]))
    return out
