"""The ledger's own accountant: an independent PLD recomputation of what a site spent.

Honest reports (Opacus' own figures for the contract's plan) stand; under-reports, off-plan
histories and noise that cannot meet the target are caught. The settings are the ones a
study of this consortium runs: a few hundred records, batches of 32 to 64, 1 to 5 rounds.
"""

from __future__ import annotations

import warnings

import pytest
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from concord_protocol.contract import RosterMember, StudyContract
from concord_protocol.dp_plan import step_plan
from concord_protocol.rounds import SiteSpend
from consortium_server.budgets.accountant import TOLERANCE, check_report, pld_epsilon
from site_node.privacy.dp import DpTrainer
from tests.support.world import study_contract

SETTINGS = [  # (records, batch, rounds, local epochs, target epsilon)
    (190, 64, 3, 1, 3.0),
    (152, 32, 5, 2, 1.0),
    (600, 64, 1, 3, 8.0),
    (186, 2, 2, 1, 4.0),
]


def _contract(records: int, batch: int, rounds: int, epochs: int, epsilon: float) -> StudyContract:
    body = study_contract(
        ["bc-a"],
        training={"rounds": rounds, "local_epochs": epochs, "batch_size": batch},
        privacy={"epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0},
    )
    body["roster"] = [
        RosterMember(site_id="hospital-a", key_fingerprint="a" * 64, max_examples=records)
    ]
    body["key_generator"] = "hospital-a"
    return StudyContract.model_validate(body)


def _opacus(contract: StudyContract, records: int, rounds_done: int) -> SiteSpend:
    """What an honest site reports after ``rounds_done`` rounds: the site's own plan
    (training noise that leaves room for the evaluation releases), its epsilon by Opacus'
    PRV accountant over DP-SGD steps and one release per round."""
    training, privacy = contract.training, contract.privacy
    plan = step_plan(records, training.batch_size)
    per_round = plan.steps_per_epoch * training.local_epochs
    eval_noise = contract.evaluation_noise()
    noise = DpTrainer(
        privacy, training, num_samples=records, evaluation_noise_multiplier=eval_noise
    ).noise_multiplier
    history = [(noise, plan.sample_rate, per_round * rounds_done)]
    if eval_noise is not None:
        history.append((eval_noise, 1.0, rounds_done))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = create_accountant(mechanism="prv")
        accountant.history = history
        epsilon = accountant.get_epsilon(delta=privacy.delta)
    return SiteSpend(
        epsilon=epsilon,
        delta=privacy.delta,
        noise_multiplier=noise,
        sample_rate=plan.sample_rate,
        steps=per_round * rounds_done,
        num_samples=records,
        evaluations=rounds_done if eval_noise is not None else 0,
        evaluation_noise_multiplier=eval_noise,
    )


def test_without_evaluation_releases_the_plan_is_training_alone() -> None:
    contract = _contract(190, 64, 3, 1, 3.0)
    quiet = contract.model_copy(
        update={"evaluation": contract.evaluation.model_copy(update={"mode": "none"})}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = get_noise_multiplier(
            target_epsilon=3.0,
            target_delta=1e-5,
            sample_rate=step_plan(190, 64).sample_rate,
            steps=3 * step_plan(190, 64).steps_per_epoch,
            accountant="prv",
        )
    honest = _opacus(quiet, 190, 3)
    assert honest.noise_multiplier == pytest.approx(plain)
    assert check_report(quiet, "hospital-a", honest).problem == ""
    # The releases cost budget: the same study with them needs more training noise.
    assert _opacus(contract, 190, 3).noise_multiplier > plain


def test_a_report_that_leaves_out_evaluation_releases_is_disputed() -> None:
    contract = _contract(190, 64, 3, 1, 3.0)
    honest = _opacus(contract, 190, 2)
    hidden = honest.model_copy(update={"evaluations": 0, "evaluation_noise_multiplier": None})
    check = check_report(contract, "hospital-a", hidden)
    assert "0 evaluation releases for 2 rounds trained" in check.problem
    assert check.recomputed == pytest.approx(
        pld_epsilon(
            honest.noise_multiplier,
            honest.sample_rate,
            honest.steps,
            1e-5,
            2,
            contract.evaluation_noise(),
        )
    )
    louder = honest.model_copy(update={"evaluation_noise_multiplier": 1.0})
    assert "evaluation noise 1.0 is not the contract" in (
        check_report(contract, "hospital-a", louder).problem
    )


@pytest.mark.parametrize("setting", SETTINGS)
def test_an_honest_site_report_stands_and_agrees_with_the_pld_accountant(
    setting: tuple[int, int, int, int, float],
) -> None:
    records, *_ = setting
    contract = _contract(*setting)
    for done in range(1, contract.training.rounds + 1):
        spend = _opacus(contract, records, done)
        check = check_report(contract, "hospital-a", spend)
        assert check.problem == ""
        assert check.charge == spend.epsilon
        assert check.recomputed is not None
        # Two independent accountants: PRV (Opacus) is an upper estimate of PLD's figure.
        assert abs(check.recomputed - spend.epsilon) <= TOLERANCE


@pytest.mark.parametrize("setting", SETTINGS)
def test_an_under_report_is_disputed_and_charged_the_recomputed_figure(
    setting: tuple[int, int, int, int, float],
) -> None:
    records, *_ = setting
    contract = _contract(*setting)
    spend = _opacus(contract, records, contract.training.rounds)
    low = spend.model_copy(update={"epsilon": spend.epsilon / 2})
    check = check_report(contract, "hospital-a", low)
    assert "below the ledger's recomputed" in check.problem
    assert check.recomputed is not None
    assert check.charge == pytest.approx(check.recomputed)
    assert check.charge > low.epsilon


def test_noise_too_small_for_the_target_is_refused_and_charged_its_true_cost() -> None:
    contract = _contract(190, 64, 3, 1, 3.0)
    honest = _opacus(contract, 190, 1)
    weak = honest.model_copy(update={"noise_multiplier": honest.noise_multiplier / 3})
    check = check_report(contract, "hospital-a", weak)
    assert "above the contract's target 3" in check.problem
    assert check.recomputed == pytest.approx(
        pld_epsilon(
            weak.noise_multiplier,
            weak.sample_rate,
            weak.steps,
            1e-5,
            weak.evaluations,
            weak.evaluation_noise_multiplier,
        )
    )
    assert check.charge >= check.recomputed > honest.epsilon


def test_more_records_than_published_or_another_delta_is_off_plan() -> None:
    contract = _contract(190, 64, 3, 1, 3.0)
    honest = _opacus(contract, 190, 1)
    more = check_report(contract, "hospital-a", honest.model_copy(update={"num_samples": 400}))
    assert "more than the 190 the site published" in more.problem
    assert "sample rate" in more.problem  # 400 records are another plan, too
    delta = check_report(contract, "hospital-a", honest.model_copy(update={"delta": 1e-3}))
    assert "delta 0.001 is not the contract's 1e-05" in delta.problem
    assert delta.charge >= honest.epsilon


def test_pld_epsilon_grows_with_steps_and_falls_with_noise() -> None:
    assert pld_epsilon(1.0, 0.25, 0, 1e-5) == 0.0
    assert pld_epsilon(1.0, 0.25, 8, 1e-5) < pld_epsilon(1.0, 0.25, 16, 1e-5)
    assert pld_epsilon(2.0, 0.25, 16, 1e-5) < pld_epsilon(1.0, 0.25, 16, 1e-5)
