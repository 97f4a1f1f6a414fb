"""The `site-node` CLI: keys, the enrolment request, the model catalogue, local data."""

from __future__ import annotations

import stat
from pathlib import Path

import yaml
from typer.testing import CliRunner

from consortium_server.sites.schemas import SiteEnrol
from site_node.cli import app

runner = CliRunner()


def test_keys_then_enrolment_request_is_accepted_by_the_server_schema(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert runner.invoke(app, ["keys", "init", "--dir", str(keys)]).exit_code == 0
    for name in ("supernode",):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    result = runner.invoke(
        app,
        [
            "keys",
            "enrolment",
            "--dir",
            str(keys),
            "--site-id",
            "hospital-z",
            "--organisation",
            "Hospital Z",
            "--contact",
            "it@z.example.org",
        ],
    )
    assert result.exit_code == 0, result.output
    body = yaml.safe_load(result.output)
    enrol = SiteEnrol.model_validate(body)
    assert enrol.id == "hospital-z"
    assert "PRIVATE" not in result.output


def test_keys_init_refuses_to_overwrite(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert runner.invoke(app, ["keys", "init", "--dir", str(keys)]).exit_code == 0
    again = runner.invoke(app, ["keys", "init", "--dir", str(keys)])
    assert again.exit_code == 1
    assert "refusing to overwrite" in again.output


def test_models_list_shows_the_catalogue() -> None:
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0
    names = {entry["name"] for entry in yaml.safe_load(result.output)}
    assert {"tabular-mlp", "image-cnn", "image-densenet"} <= names


def _datasets_file(tmp_path: Path) -> Path:
    csv = tmp_path / "cohort.csv"
    rows = ["age,marker,label"] + [f"{40 + i},{i % 7}.5,{i % 2}" for i in range(40)]
    csv.write_text("\n".join(rows) + "\n")
    path = tmp_path / "datasets.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "datasets": [
                    {
                        "id": "cohort",
                        "kind": "csv",
                        "path": str(csv),
                        "label_column": "label",
                        "classes": ["0", "1"],
                        "feature_ranges": {"age": [18, 100], "marker": [0, 10]},
                    },
                    {"id": "bc-demo", "kind": "demo_breast_cancer", "site_index": 0},
                ]
            }
        )
    )
    return path


def test_data_check_summarises_without_records(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "check", "--file", str(_datasets_file(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "cohort" in result.output
    assert "bc-demo" in result.output
    assert "45.5" not in result.output  # no feature values


def test_data_check_reports_a_broken_dataset(tmp_path: Path) -> None:
    path = tmp_path / "datasets.yaml"
    path.write_text(
        yaml.safe_dump(
            [{"id": "gone", "kind": "csv", "path": str(tmp_path / "x.csv"), "classes": ["a", "b"]}]
        )
    )
    result = runner.invoke(app, ["data", "check", "--file", str(path)])
    assert result.exit_code == 1


def test_catalogue_entry_combines_governance_and_local_summary(tmp_path: Path) -> None:
    governance = tmp_path / "governance.yaml"
    governance.write_text(
        yaml.safe_dump(
            {
                "id": "cohort-a",
                "site_id": "hospital-a",
                "title": "Cohort",
                "allowed_purposes": ["diagnostic_research"],
                "epsilon_budget": 10.0,
                "delta_budget": 1e-4,
                "max_epsilon_per_study": 5.0,
                "controller": "Hospital A",
                "data_categories": ["health data"],
                "legal_basis": "GDPR Art. 9(2)(j)",
                "retention": "10 years",
            }
        )
    )
    result = runner.invoke(
        app,
        [
            "data",
            "catalogue-entry",
            "cohort",
            "--governance",
            str(governance),
            "--file",
            str(_datasets_file(tmp_path)),
        ],
    )
    assert result.exit_code == 0, result.output
    entry = yaml.safe_load(result.stdout)
    assert entry["record_count"] == 40
    # The steward is told what publishing declares public (on stderr, off the YAML).
    assert "declares public, without differential privacy: record count" in result.stderr
    assert "label counts of the training split" in result.stderr
    assert entry["task"] == "binary_classification"
    from consortium_server.datasets.schemas import DatasetPublish

    DatasetPublish.model_validate(entry)
