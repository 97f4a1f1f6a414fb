"""checkov over the rendered manifests: every failed check is in a short, commented
allow-list (``checkov-allow.yaml``), and every allow-list entry still fails somewhere.

Both charts are rendered with every valid values file (minimal, production, the end-to-end
deployment's) and scanned with checkov's Kubernetes framework, run from its own venv
(``make install`` creates ``.venv-checkov``: its pins clash with the project's).
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.charts import REPO, VALID_VALUES, VALUES, load_values, render

pytestmark = pytest.mark.slow

CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
ALLOW = Path(__file__).with_name("checkov-allow.yaml")


def rendered_sets() -> list[tuple[str, str, dict[str, Any]]]:
    sets = [
        (chart, name, load_values(name)) for chart, names in VALID_VALUES.items() for name in names
    ]
    for path in sorted((VALUES / "e2e").glob("*.yaml")):
        chart = "server" if path.name == "server.yaml" else "site"
        sets.append((chart, f"e2e/{path.name}", yaml.safe_load(path.read_text())))
    return sets


def allow_list() -> list[dict[str, str]]:
    entries = yaml.safe_load(ALLOW.read_text())["allow"]
    for entry in entries:
        assert entry.get("why"), f"{entry} has no reason"
    return list(entries)


def test_rendered_manifests_pass_checkov_but_for_the_allow_list(tmp_path: Path) -> None:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: run `make install` (it creates .venv-checkov)")
    for chart, name, values in rendered_sets():
        docs = render(chart, values).docs()
        out = tmp_path / f"{chart}-{name.replace('/', '-')}"
        out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    result = subprocess.run(
        [
            str(CHECKOV),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "-o",
            "json",
            "--quiet",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        (check["check_id"], check["resource"], check["check_name"])
        for r in reports
        for check in r["results"]["failed_checks"]
    ]
    assert sum(r["summary"]["passed"] for r in reports) > 100  # it did scan the manifests

    entries = allow_list()
    used: set[int] = set()
    unexplained = []
    for check_id, resource, title in failed:
        matches = [
            i
            for i, e in enumerate(entries)
            if e["check"] == check_id and fnmatch.fnmatch(resource, e.get("resources", "*"))
        ]
        if matches:
            used.update(matches)
        else:
            unexplained.append(f"{check_id} {resource}: {title}")
    assert not unexplained, "checkov failures not in checkov-allow.yaml:\n" + "\n".join(
        sorted(set(unexplained))
    )
    stale = [entries[i] for i in range(len(entries)) if i not in used]
    assert not stale, f"allow-list entries that no longer fail (remove them): {stale}"
