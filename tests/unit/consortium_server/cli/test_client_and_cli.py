"""The Python client and the `consortium` CLI against the real app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from concord_protocol.client import ApiError, ConsortiumClient
from tests.support.cli import run_cli as _cli
from tests.support.world import People, study_contract


@pytest.fixture
def api(client: TestClient, consortium: People) -> ConsortiumClient:
    return ConsortiumClient(
        "http://testserver",
        consortium.researcher["Authorization"][7:],
        transport=client._transport,  # the app itself, in process
    )


def test_client_submits_and_reads(api: ConsortiumClient) -> None:
    study = api.submit_study(study_contract(["bc-a", "bc-b", "bc-c"]))
    assert api.get_study(study["id"])["contract_hash"] == study["contract_hash"]
    assert [s["id"] for s in api.list_studies()] == [study["id"]]
    assert {d["id"] for d in api.list_datasets()} == {"bc-a", "bc-b", "bc-c"}


def test_client_raises_api_errors_with_codes(api: ConsortiumClient) -> None:
    with pytest.raises(ApiError) as info:
        api.get_study("nope")
    assert info.value.status == 404
    assert info.value.code == "study.not_found"
    assert info.value.request_id


def test_client_reports_an_unreachable_server() -> None:
    with pytest.raises(ApiError) as info:
        ConsortiumClient("http://127.0.0.1:9", "t", timeout_s=2).me()
    assert info.value.code == "connection"


def test_client_renews_tokens_through_a_callable(client: TestClient, consortium: People) -> None:
    calls: list[int] = []

    def provider() -> str:
        calls.append(1)
        return consortium.researcher["Authorization"][7:]

    api = ConsortiumClient("http://testserver", provider, transport=client._transport)
    api.me()
    api.me()
    assert len(calls) == 2


def test_cli_submit_approve_flow(
    client: TestClient, consortium: People, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_contract(["bc-a", "bc-b", "bc-c"])))
    code, out = _cli(
        client, monkeypatch, consortium.researcher, "--json", "study", "submit", str(path)
    )
    assert code == 0, out
    study = json.loads(out)
    assert study["state"] == "awaiting_approvals"
    for site in "abc":
        code, out = _cli(
            client,
            monkeypatch,
            consortium.steward(site),
            "study",
            "approve",
            study["id"],
            "--site",
            f"hospital-{site}",
            "--yes",
        )
        assert code == 0, out
    code, out = _cli(client, monkeypatch, consortium.researcher, "study", "status", study["id"])
    assert "approved" in out


def test_cli_rejected_study_exits_2(
    client: TestClient, consortium: People, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_contract(["bc-a"])))
    code, out = _cli(client, monkeypatch, consortium.researcher, "study", "submit", str(path))
    assert code == 2
    assert "rejected" in out


def test_cli_names_invalid_fields(
    client: TestClient, consortium: People, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "study.yaml"
    contract = study_contract(["bc-a", "bc-b", "bc-c"])
    del contract["purpose"]
    path.write_text(yaml.safe_dump(contract))
    code, out = _cli(client, monkeypatch, consortium.researcher, "study", "submit", str(path))
    assert code == 1
    assert "body.purpose" in out


def test_cli_approve_with_stale_hash_refuses(
    client: TestClient, consortium: People, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"]),
        headers=consortium.researcher,
    ).json()
    code, out = _cli(
        client,
        monkeypatch,
        consortium.steward("a"),
        "study",
        "approve",
        study["id"],
        "--site",
        "hospital-a",
        "--hash",
        "f" * 64,
    )
    assert code == 1
    assert "review it again" in out


def test_cli_refuses_a_non_mapping_file(
    client: TestClient, consortium: People, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "study.yaml"
    path.write_text("- just\n- a list\n")
    code, out = _cli(client, monkeypatch, consortium.researcher, "study", "submit", str(path))
    assert code == 1
    assert "mapping" in out
