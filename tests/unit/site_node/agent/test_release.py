"""The agent's release step: after a run completes, every site decrypts the final model and
signs off its hash, and exactly one site uploads it; then the owner can release it."""

from __future__ import annotations

from fastapi import FastAPI

from tests.support.runs import begin, federation_gate, synthetic_run
from tests.unit.site_node.agent.conftest import World


def _completed_study(world: World, app: FastAPI) -> str:
    study_id, _ = world.submit_study()
    for hospital in world.sites.values():  # sync + key exchange (a generates, b/c receive)
        hospital.agent.run_pass()
    for hospital in world.sites.values():
        hospital.agent.run_pass()
    key = world.sites["a"].store.study_key(study_id)
    assert key is not None
    plan = begin(app, study_id)
    synthetic_run(
        federation_gate(app, world.client, plan),
        [1.0] * plan.rounds,
        secret=key.secret_context,
        signers={h.site_id: h.keys.signing_key for h in world.sites.values()},
    )
    assert world.study(study_id)["state"] == "completed"
    return study_id


def test_agents_sign_off_and_one_uploads(world: World, app: FastAPI) -> None:
    study_id = _completed_study(world, app)
    reports = [h.agent.run_pass() for h in world.sites.values()]
    assert all(r.ok for r in reports), [r.steps for r in reports]
    signed = [r.release.signed if r.release else [] for r in reports]
    uploaded = [r.release.uploaded if r.release else [] for r in reports]
    assert signed == [[study_id], [study_id], [study_id]]
    assert uploaded == [[study_id], [], []]  # hospital-a, the smallest site id

    status = world.client.get(
        f"/api/v1/studies/{study_id}/release", headers=world.people.researcher
    ).json()
    assert status["pending_sites"] == []
    assert status["hashes_agree"] is True
    assert status["model_layout"] is True  # uploaded with its parameter layout
    released = world.client.post(
        f"/api/v1/studies/{study_id}/release", headers=world.people.researcher
    )
    assert released.status_code == 200, released.text

    again = [h.agent.run_pass() for h in world.sites.values()]  # nothing left to sign
    assert all(r.release is not None and r.release.signed == [] for r in again)


def test_an_upload_that_fails_after_the_sign_off_is_sent_again_without_signing_twice(
    world: World, app: FastAPI
) -> None:
    study_id = _completed_study(world, app)
    uploader = world.sites["a"]
    model_path = f"/studies/{study_id}/release/model"
    uploader.transport.fail_once[model_path] = 500  # signed off, then the upload fails
    report = uploader.agent.run_pass()
    release = next(step for step in report.steps if step.name == "release")
    assert (release.ok, release.attempts) == (True, 2)  # the step's retry only uploaded
    assert report.release is not None
    assert (report.release.signed, report.release.uploaded) == ([], [study_id])
    posts = uploader.transport.posts()
    assert sum(p.endswith("/release/signoffs") for p in posts) == 1
    assert sum(p.endswith(model_path) for p in posts) == 2
    status = world.client.get(
        f"/api/v1/studies/{study_id}/release", headers=world.people.researcher
    ).json()
    assert "hospital-a" not in status["pending_sites"]
    assert status["model_sha256"] is not None
    again = uploader.agent.run_pass().release
    assert again is not None
    assert (again.signed, again.uploaded) == ([], [])
