"""The ledger's own accountant: what a site should have spent, recomputed on the server.

A site reports its Opacus accountant's cumulative epsilon with a signed spend report
(:mod:`concord_protocol.spend_reports`). The server does not take the figure on trust: from
the study contract (batch size, local epochs, rounds, delta, target epsilon) and the site's
training count, it derives the step plan Opacus executes
(:func:`concord_protocol.dp_plan.step_plan`, shared with the sites) and checks the report
against it, then recomputes the epsilon of the reported history with Google's PLD
accountant (``dp_accounting``), an implementation independent of Opacus'.
:func:`check_report` returns the verdict:

* **off plan**: the sample rate is not the plan's for the count, the count exceeds what the
  site published, the steps are not a whole number of rounds, or more rounds than the
  contract has, or the noise multiplier could not meet the contract's target: the report
  is refused, and charged at the recomputed figure when there is one;
* **disputed**: the reported epsilon is below the recomputed one by more than
  :data:`TOLERANCE` (the two accountants agree to about 0.01 on the same history; Opacus'
  PRV accountant reports an upper estimate): the ledger charges the recomputed figure;
* otherwise the report stands and is charged as reported.

Epsilon is computed at the contract's delta, for Poisson-subsampled Gaussian steps
composed with the evaluation releases (one Gaussian mechanism of sensitivity 1 per round
trained, :mod:`concord_protocol.eval_histograms`), under the add/remove-one-record
neighbouring relation Opacus' accountants assume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

from concord_protocol.contract import StudyContract, StudyDraft
from concord_protocol.dp_plan import step_plan
from concord_protocol.rounds import SiteSpend

__all__ = ["TOLERANCE", "SpendCheck", "check_report", "evaluation_epsilon", "pld_epsilon"]

#: How far a reported epsilon may fall below the ledger's figure before it is disputed.
TOLERANCE = 0.02
_RELATIVE = 0.01
_DISCRETISATION = 1e-4


@lru_cache(maxsize=1024)
def pld_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    evaluations: int = 0,
    evaluation_noise: float | None = None,
) -> float:
    """Epsilon at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps composed with
    ``evaluations`` Gaussian releases of noise ``evaluation_noise`` (PLD accountant)."""
    events: list[dp_accounting.DpEvent] = []
    if steps > 0:
        events.append(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
                ),
                steps,
            )
        )
    if evaluations > 0 and evaluation_noise is not None:
        events.append(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.GaussianDpEvent(evaluation_noise), evaluations
            )
        )
    if not events:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=_DISCRETISATION)
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def evaluation_epsilon(contract: StudyContract | StudyDraft) -> float | None:
    """Epsilon of the study's evaluation releases alone (one per round), for the card; the
    ledger charges their composition with training, which costs less than the sum."""
    noise = contract.evaluation_noise()
    if noise is None:
        return None
    return pld_epsilon(1.0, 1.0, 0, float(contract.privacy.delta), contract.training.rounds, noise)


@dataclass(frozen=True)
class SpendCheck:
    """The ledger's verdict on one site's spend report."""

    #: Epsilon the ledger recomputed for the reported history (None when it cannot).
    recomputed: float | None
    #: What the ledger charges: the report, or the recomputed figure when that is higher.
    charge: float
    #: Why the report was refused or disputed ("" when it stands).
    problem: str = ""


def check_report(contract: StudyContract, site_id: str, spend: SiteSpend) -> SpendCheck:
    """Check ``spend`` against the contract's plan for ``site_id`` and recompute its epsilon."""
    problems: list[str] = []
    training, privacy = contract.training, contract.privacy
    member = contract.member(site_id)
    if member is not None and spend.num_samples > member.max_examples:
        problems.append(
            f"it trains on {spend.num_samples} records, more than the {member.max_examples} "
            "the site published"
        )
    plan = step_plan(spend.num_samples, training.batch_size)
    if spend.sample_rate != plan.sample_rate:
        problems.append(
            f"sample rate {spend.sample_rate:.6g} is not the plan's {plan.sample_rate:.6g} for "
            f"{spend.num_samples} records in batches of {training.batch_size}"
        )
    per_round = plan.steps_per_epoch * training.local_epochs
    if spend.steps % per_round or spend.steps > per_round * training.rounds:
        problems.append(
            f"{spend.steps} steps are not a whole number of rounds of {per_round} steps, up to "
            f"{training.rounds} rounds"
        )
    if spend.delta != privacy.delta:
        problems.append(f"delta {spend.delta:g} is not the contract's {privacy.delta:g}")
    spec = contract.evaluation
    contract_noise = contract.evaluation_noise()
    # The ledger charges the evaluations the contract lets the site make so far (one per
    # round trained), or the report's count when higher: never fewer than were possible.
    evaluations = spend.evaluations
    if spec.releases:
        rounds_trained = -(-spend.steps // per_round) if per_round else 0
        evaluations = max(evaluations, rounds_trained)
        if spend.evaluations != rounds_trained:
            problems.append(
                f"{spend.evaluations} evaluation releases for {rounds_trained} rounds trained"
            )
        if spend.evaluation_noise_multiplier != contract_noise:
            problems.append(
                f"evaluation noise {spend.evaluation_noise_multiplier} is not the contract's "
                f"{contract_noise:g}"
            )
    eval_noise = contract_noise if spec.releases else spend.evaluation_noise_multiplier
    if spend.evaluation_noise_multiplier is not None:
        eval_noise = min(eval_noise or math.inf, spend.evaluation_noise_multiplier)
    recomputed = pld_epsilon(
        spend.noise_multiplier,
        plan.sample_rate,
        spend.steps,
        float(privacy.delta),
        evaluations,
        eval_noise,
    )
    if not problems:
        full_study = pld_epsilon(
            spend.noise_multiplier,
            plan.sample_rate,
            per_round * training.rounds,
            float(privacy.delta),
            training.rounds if spec.releases else 0,
            eval_noise,
        )
        if full_study > privacy.epsilon + TOLERANCE + _RELATIVE * privacy.epsilon:
            problems.append(
                f"noise multiplier {spend.noise_multiplier:.6g} gives epsilon {full_study:.4f} "
                f"over the whole study, above the contract's target {privacy.epsilon:g}"
            )
    reported = spend.epsilon
    if reported < 0:
        problems.append(f"reported epsilon {reported:g} is negative")
    if math.isfinite(reported) and reported < recomputed - (TOLERANCE + _RELATIVE * recomputed):
        problems.append(
            f"reported epsilon {reported:.4f} is below the ledger's recomputed {recomputed:.4f}"
        )
    charge = max(reported, recomputed) if math.isfinite(reported) else recomputed
    if not problems:
        charge = reported
    return SpendCheck(recomputed=recomputed, charge=charge, problem="; ".join(problems))
