"""DpTrainer: accounting equals Opacus', budget refusal, persistence across save/load."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from concord_protocol.contract import ModelSpec, PrivacySpec, TrainingSpec
from site_node.data import LocalDataset
from site_node.errors import (
    AccountantStateError,
    DatasetMismatchError,
    PrivacyBudgetExhaustedError,
    PrivacyConfigurationError,
)
from site_node.privacy import DpTrainer
from site_node.training import build_model, flatten, train_round

torch.set_num_threads(1)

N, BATCH, SIGMA = 40, 10, 3.0  # sample rate 1/4, 4 steps per epoch
MLP = ModelSpec(name="tabular-mlp", version="1", hyperparameters={"hidden": 8, "layers": 1})
TRAINING = TrainingSpec(rounds=3, local_epochs=1, batch_size=BATCH, learning_rate=0.2)


def _fresh_epsilon(steps: int, delta: float, mechanism: str = "prv") -> float:
    """Epsilon from a brand-new Opacus accountant, independent of site_node code."""
    accountant = PRVAccountant() if mechanism == "prv" else RDPAccountant()
    accountant.history = [(SIGMA, 1 / 4, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def _data() -> LocalDataset:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(N) % 2
    return LocalDataset(
        features=torch.randn(N, 5, generator=gen) + labels[:, None].float(),
        labels=labels,
        num_classes=2,
        modality="tabular",
    )


def _trainer(epsilon: float = 50.0, **kw: object) -> DpTrainer:
    return DpTrainer(
        PrivacySpec(epsilon=epsilon, delta=1e-5, max_grad_norm=1.0),
        TRAINING,
        num_samples=N,
        noise_multiplier=SIGMA,
        **kw,  # type: ignore[arg-type]
    )


def test_plan_uses_opacus_sample_rate_and_steps() -> None:
    plan = _trainer().plan
    assert plan.sample_rate == 0.25
    assert plan.steps_per_epoch == 4
    assert plan.steps_per_round == 4
    assert plan.total_steps == 12
    odd = DpTrainer(
        PrivacySpec(epsilon=50, delta=1e-5), TRAINING, num_samples=41, noise_multiplier=SIGMA
    )
    assert odd.plan.sample_rate == 1 / 5  # 1 / ceil(41 / 10), as Opacus derives it


def test_epsilon_equals_a_fresh_opacus_accountant_before_and_after_save_load(
    tmp_path: Path,
) -> None:
    data = _data()
    model = build_model(MLP, input_shape=(5,), num_classes=2)
    trainer = _trainer()
    assert trainer.epsilon_spent() == 0.0
    for k in (1, 2):
        result = train_round(model, data, TRAINING, dp=trainer, seed=k)
        expected = _fresh_epsilon(4 * k, 1e-5)
        assert trainer.history == ((SIGMA, 0.25, 4 * k),)
        assert result.epsilon_spent == pytest.approx(expected, abs=1e-6)
        assert trainer.epsilon_spent() == pytest.approx(expected, abs=1e-6)
    assert trainer.rounds_completed == 2
    path = tmp_path / "state" / "dp.json"
    trainer.save(path)
    restored = DpTrainer.load(path, training=TRAINING, num_samples=N)
    assert restored.history == trainer.history
    assert restored.rounds_completed == 2
    assert restored.epsilon_spent() == pytest.approx(_fresh_epsilon(8, 1e-5), abs=1e-6)
    # Training continues on the restored accountant and keeps matching Opacus.
    result = train_round(model, data, TRAINING, dp=restored, seed=3)
    assert result.epsilon_spent == pytest.approx(_fresh_epsilon(12, 1e-5), abs=1e-6)


def test_rdp_accountant_matches_too() -> None:
    trainer = _trainer(accountant="rdp")
    result = train_round(
        build_model(MLP, input_shape=(5,), num_classes=2), _data(), TRAINING, dp=trainer, seed=0
    )
    assert result.epsilon_spent == pytest.approx(_fresh_epsilon(4, 1e-5, "rdp"), abs=1e-6)


def test_round_that_would_exceed_the_target_is_refused() -> None:
    target = _fresh_epsilon(8, 1e-5) + 1e-6  # exactly two rounds fit
    trainer = _trainer(epsilon=target)
    data = _data()
    model = build_model(MLP, input_shape=(5,), num_classes=2)
    train_round(model, data, TRAINING, dp=trainer, seed=0)
    train_round(model, data, TRAINING, dp=trainer, seed=1)
    weights, history = flatten(model), trainer.history
    with pytest.raises(PrivacyBudgetExhaustedError, match="above the study's target") as info:
        train_round(model, data, TRAINING, dp=trainer, seed=2)
    assert info.value.code == "privacy.budget_exhausted"
    assert np.array_equal(flatten(model), weights)  # nothing trained
    assert trainer.history == history  # nothing charged
    assert trainer.epsilon_spent() <= target


def test_dataset_of_another_size_is_refused() -> None:
    trainer = _trainer()
    small = LocalDataset(
        features=torch.zeros(30, 5),
        labels=torch.arange(30) % 2,
        num_classes=2,
        modality="tabular",
    )
    model = build_model(MLP, input_shape=(5,), num_classes=2)
    with pytest.raises(DatasetMismatchError, match="40 records"):
        train_round(model, small, TRAINING, dp=trainer)
    assert trainer.steps_taken == 0


def test_state_dict_round_trip_and_mismatch(tmp_path: Path) -> None:
    trainer = _trainer()
    trainer.load_state_dict(
        {**trainer.state_dict(), "history": [[SIGMA, 0.25, 5]], "rounds_completed": 1}
    )
    assert trainer.steps_taken == 5
    state = trainer.state_dict()
    assert json.loads(json.dumps(state)) == state
    other = DpTrainer(
        PrivacySpec(epsilon=50, delta=1e-5),
        TrainingSpec(rounds=4, batch_size=BATCH),
        num_samples=N,
        noise_multiplier=SIGMA,
    )
    with pytest.raises(AccountantStateError, match="rounds"):
        other.load_state_dict(state)
    with pytest.raises(AccountantStateError, match="another plan"):
        trainer.load_state_dict({**state, "history": [[SIGMA + 1, 0.25, 5]]})
    path = tmp_path / "dp.json"
    trainer.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["dp.json"]  # no temp files left behind
    with pytest.raises(AccountantStateError, match="num_samples"):
        DpTrainer.load(path, num_samples=N + 1)
    path.write_text("{not json")
    with pytest.raises(AccountantStateError, match="cannot read"):
        DpTrainer.load(path)


@pytest.mark.slow
def test_noise_multiplier_is_searched_for_the_whole_study() -> None:
    training = TrainingSpec(rounds=20, batch_size=32)
    privacy = PrivacySpec(epsilon=3.0, delta=1e-5)
    trainer = DpTrainer(privacy, training, num_samples=128)  # q = 1/4, 80 steps
    accountant = PRVAccountant()
    accountant.history = [(trainer.noise_multiplier, 0.25, 80)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = accountant.get_epsilon(delta=1e-5)
    assert 2.9 < final <= 3.0
    assert trainer.rounds_remaining() == 20


def test_a_plan_where_opacus_takes_k_minus_1_steps_trains_and_reloads_every_round(
    tmp_path: Path,
) -> None:
    """n = 186, batch 2: 93 loader batches, which Opacus runs as 92 steps at rate 1/92.

    The plan is Opacus' plan, so each round is charged exactly its steps, the state
    reloads between rounds, and the last round of the study is allowed.
    """
    n, training = 186, TrainingSpec(rounds=2, local_epochs=1, batch_size=2, learning_rate=0.1)
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % 2
    data = LocalDataset(
        features=torch.randn(n, 4, generator=gen) + labels[:, None].float(),
        labels=labels,
        num_classes=2,
        modality="tabular",
    )
    privacy = PrivacySpec(epsilon=8.0, delta=1e-5, max_grad_norm=1.0)
    trainer = DpTrainer(privacy, training, num_samples=n)
    assert (trainer.plan.steps_per_epoch, trainer.plan.sample_rate) == (92, 1 / 92)
    path = tmp_path / "dp.json"
    model = build_model(MLP, input_shape=(4,), num_classes=2, seed=0)
    for round_number in (1, 2):
        result = train_round(model, data, training, dp=trainer, seed=round_number)
        assert result.steps == 92
        assert trainer.steps_taken == 92 * round_number
        assert trainer.history == ((trainer.noise_multiplier, 1 / 92, 92 * round_number),)
        trainer.save(path)
        trainer = DpTrainer.load(path, privacy=privacy, training=training, num_samples=n)
    assert trainer.rounds_completed == 2
    assert trainer.epsilon_spent() <= privacy.epsilon + 1e-9
    with pytest.raises(PrivacyBudgetExhaustedError):
        trainer.check_round_allowed()


def _fresh_with_releases(steps: int, sigma_e: float, releases: int) -> float:
    accountant = PRVAccountant()
    accountant.history = [(SIGMA, 1 / 4, steps), (sigma_e, 1.0, releases)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=1e-5))


def test_each_round_charges_its_evaluation_release_with_the_training(tmp_path: Path) -> None:
    """With evaluation releases in the plan, every round trained adds one Gaussian release
    of the evaluation noise to the accountant, before the release is made; epsilon is the
    composition, as a fresh Opacus accountant computes it, and survives save/load."""
    data = _data()
    model = build_model(MLP, input_shape=(5,), num_classes=2)
    trainer = _trainer(evaluation_noise_multiplier=6.0)
    for k in (1, 2):
        result = train_round(model, data, TRAINING, dp=trainer, seed=k)
        assert trainer.evaluations == k
        expected = _fresh_with_releases(4 * k, 6.0, k)
        assert result.epsilon_spent == pytest.approx(expected, abs=1e-6)
        assert expected > _fresh_epsilon(4 * k, 1e-5)  # the releases cost something
    projected = trainer.epsilon_after_next_round()
    assert projected == pytest.approx(_fresh_with_releases(12, 6.0, 3), abs=1e-6)
    path = tmp_path / "dp.json"
    trainer.save(path)
    restored = DpTrainer.load(path, num_samples=N, evaluation_noise_multiplier=6.0)
    assert restored.evaluations == 2
    assert restored.epsilon_spent() == pytest.approx(trainer.epsilon_spent(), abs=1e-9)
    with pytest.raises(AccountantStateError, match="evaluation_noise_multiplier"):
        DpTrainer.load(path, evaluation_noise_multiplier=None)
    state = json.loads(path.read_text())
    state["evaluations"] = -1
    path.write_text(json.dumps(state))
    with pytest.raises(AccountantStateError, match="evaluations"):
        DpTrainer.load(path)


def test_the_training_noise_leaves_room_for_the_releases_within_the_target() -> None:
    privacy = PrivacySpec(epsilon=3.0, delta=1e-5)
    training = TrainingSpec(rounds=3, batch_size=32)
    alone = DpTrainer(privacy, training, num_samples=128)
    shared = DpTrainer(privacy, training, num_samples=128, evaluation_noise_multiplier=8.0)
    assert shared.noise_multiplier > alone.noise_multiplier
    accountant = PRVAccountant()
    accountant.history = [(shared.noise_multiplier, 0.25, 12), (8.0, 1.0, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = accountant.get_epsilon(delta=1e-5)
    assert 2.95 < final <= 3.0


def test_releases_that_alone_exceed_the_target_are_a_configuration_error() -> None:
    with pytest.raises(PrivacyConfigurationError, match="evaluation releases at noise 1 alone"):
        DpTrainer(
            PrivacySpec(epsilon=1.0, delta=1e-5),
            TRAINING,
            num_samples=N,
            evaluation_noise_multiplier=1.0,
        )


def test_secure_noise_is_drawn_from_an_os_seeded_generator_with_opacus_mitigation() -> None:
    """With secure noise, a round's noise does not follow torch's seed (it comes from a
    generator seeded from the OS CSPRNG), the accounting is unchanged, and Opacus' secure
    noise (four draws summed and halved) is what the optimizer adds."""
    data = _data()

    def trained(secure: bool, seed: int) -> tuple[np.ndarray, float]:
        model = build_model(MLP, input_shape=(5,), num_classes=2)
        torch.manual_seed(0)
        for p in model.parameters():
            torch.nn.init.constant_(p, 0.1)
        trainer = _trainer(secure_mode=secure)
        result = train_round(model, data, TRAINING, dp=trainer, seed=seed)
        return flatten(model), float(result.epsilon_spent or 0.0)

    plain_a, eps_plain = trained(False, 5)
    plain_b, _ = trained(False, 5)
    secure_a, eps_secure = trained(True, 5)
    secure_b, _ = trained(True, 5)
    assert np.array_equal(plain_a, plain_b)  # torch's seed fixes ordinary noise
    assert not np.array_equal(secure_a, secure_b)  # not secure noise
    assert eps_secure == pytest.approx(eps_plain, abs=1e-12)


def test_opacus_secure_noise_has_the_planned_standard_deviation() -> None:
    from opacus.optimizers.optimizer import _generate_noise

    generator = torch.Generator().manual_seed(123)
    noise = _generate_noise(2.0, torch.zeros(200_000), generator=generator, secure_mode=True)
    assert float(noise.std()) == pytest.approx(2.0, rel=0.01)
