"""Differentially private training for one site across a whole study (Opacus DP-SGD).

A :class:`DpTrainer` is built once per (study, dataset) from the study's ``PrivacySpec``
(target epsilon, delta, clipping norm), its ``TrainingSpec`` (rounds, local epochs, batch
size) and the local dataset size. It fixes the plan for the whole study up front:

* ``steps_per_epoch`` and ``sample_rate``: exactly what Opacus executes and records for a data
  loader of ``ceil(n / batch_size)`` batches (:func:`concord_protocol.dp_plan.step_plan`:
  ``int(1 / (1 / k))`` steps, which is ``k - 1`` for some ``k``, each accounted at
  ``1 / steps``). Using Opacus' own figures keeps our accounting identical to the steps its
  optimizer hook records, for every dataset size.
* ``steps_per_round = local_epochs * steps_per_epoch``; total steps = ``rounds *
  steps_per_round``.
* ``noise_multiplier``: ``opacus.accountants.utils.get_noise_multiplier`` for the target
  (epsilon, delta) over the total steps, with the PRV accountant by default (``"rdp"`` is
  available: looser, faster, and the fallback if PRV misbehaves for extreme settings).

Each round, :meth:`DpTrainer.private_round` wraps the model, optimizer and data loader with a
fresh ``PrivacyEngine.make_private`` (Poisson sampling, flat clipping, that fixed noise
multiplier) whose accountant is replaced by the trainer's own, so ONE history of
``(noise_multiplier, sample_rate, steps)`` accumulates over all rounds. The history survives
restarts through :meth:`DpTrainer.save` / :meth:`DpTrainer.load` (JSON, atomic write).

**Cost, not accounting.** Two choices change how fast and in how much memory a round runs,
never what is accounted: the per-sample-gradient mode (:mod:`site_node.privacy.modes`, the
one measured fastest for the catalogue network, or the one asked for), and the largest
physical batch (``max_physical_batch``, the site's ``dp_max_physical_batch``). With the
latter, Opacus' ``BatchMemoryManager`` splits each Poisson-sampled logical batch into
physical batches of at most that many records; the optimizer clips and sums them and takes
its one noisy step (the one the accountant records) at the end of the logical batch. The
same steps, sample rate and noise: the same epsilon, and the same weights to float
rounding given the same seed (tested).

**Evaluation releases.** When the contract's evaluation is ``dp_histogram``, each round a
site trains is followed by at most one release of a noisy test-split histogram, a Gaussian
mechanism of noise ``evaluation_noise_multiplier`` and sensitivity 1
(:mod:`concord_protocol.eval_histograms`). The plan budgets them: the training noise
multiplier is the smallest that keeps ``rounds`` rounds of steps composed with ``rounds``
releases within the target, and each round's release is charged with the round itself
(:attr:`DpTrainer.evaluations`), before it is made. Epsilon is always that composition.

Before a round starts, the epsilon the history would reach after that round is computed on a
copy; if it exceeds the target, the round is refused with
:class:`~site_node.errors.PrivacyBudgetExhaustedError`. With the plan above exactly
``rounds`` rounds fit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader

from concord_protocol.contract import PrivacySpec, TrainingSpec
from concord_protocol.dp_plan import step_plan
from site_node.errors import (
    AccountantStateError,
    DatasetMismatchError,
    PrivacyBudgetExhaustedError,
    PrivacyConfigurationError,
)
from site_node.privacy.modes import GradSampleMode, Loss, empty_step, make_private, mode_for

__all__ = [
    "STATE_FORMAT",
    "AccountantMechanism",
    "DpPlan",
    "DpTrainer",
    "PrivateRound",
    "compute_epsilon",
]

STATE_FORMAT = "concord.dp-trainer"
_STATE_VERSION = 2  # 2: evaluation releases in the plan and the state
_EPS_SLACK = 1e-9  # float noise only; the plan itself is exact

AccountantMechanism = Literal["prv", "rdp"]
HistoryEntry = tuple[float, float, int]


@lru_cache(maxsize=256)
def _noise_multiplier(
    epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str
) -> float:
    with warnings.catch_warnings():
        # PRV sizes its domain with RDP, which warns about its alpha grid: harmless here.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=mechanism,
            )
        )


@lru_cache(maxsize=256)
def _noise_multiplier_with_releases(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: str,
    evaluation_noise: float,
    releases: int,
) -> float:
    """The smallest DP-SGD noise multiplier (to 0.1 % of it) whose ``steps`` composed with
    ``releases`` Gaussian evaluation releases stay within ``epsilon``: the training noise
    is raised just enough to leave room for the evaluations in the same budget.

    Raises:
        ValueError: the evaluation releases alone exceed ``epsilon``.
    """
    releases_only = ((evaluation_noise, 1.0, releases),)
    if _epsilon_cached(mechanism, releases_only, delta) >= epsilon:
        raise ValueError(
            f"{releases} evaluation releases at noise {evaluation_noise:g} alone exceed "
            f"epsilon {epsilon:g}"
        )

    def spent(noise: float) -> float:
        history = ((noise, sample_rate, steps), (evaluation_noise, 1.0, releases))
        return _epsilon_cached(mechanism, history, delta)

    low = _noise_multiplier(epsilon, delta, sample_rate, steps, mechanism)  # training alone
    high = low * 1.25
    while spent(high) > epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError("no noise multiplier meets the target with these releases")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if spent(mid) > epsilon:
            low = mid
        else:
            high = mid
    return high


@lru_cache(maxsize=256)
def _epsilon_cached(mechanism: str, history: tuple[HistoryEntry, ...], delta: float) -> float:
    if not history:
        return 0.0
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    with warnings.catch_warnings():
        # RDP alpha-grid notes, and log(1 - q) = -inf at q = 1 (handled by PRV): harmless.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(accountant.get_epsilon(delta=delta))


def compute_epsilon(
    history: list[HistoryEntry] | tuple[HistoryEntry, ...],
    *,
    delta: float,
    mechanism: AccountantMechanism = "prv",
) -> float:
    """Epsilon of a ``(noise_multiplier, sample_rate, steps)`` history, via an Opacus accountant.

    Same as a fresh ``create_accountant(mechanism)`` with that history; 0 for no steps.
    """
    return _epsilon_cached(
        mechanism, tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta)
    )


def _append_steps(
    history: tuple[HistoryEntry, ...], noise: float, rate: float, steps: int
) -> tuple[HistoryEntry, ...]:
    """The history after ``steps`` more steps, merged as Opacus' accountants merge them."""
    if steps <= 0:
        return history
    if history and history[-1][0] == noise and history[-1][1] == rate:
        return (*history[:-1], (noise, rate, history[-1][2] + steps))
    return (*history, (noise, rate, steps))


@dataclass(frozen=True)
class DpPlan:
    """The study-wide DP plan of one site (all that the accounting depends on)."""

    mechanism: AccountantMechanism
    target_epsilon: float
    delta: float
    max_grad_norm: float
    rounds: int
    local_epochs: int
    batch_size: int
    num_samples: int
    sample_rate: float
    steps_per_epoch: int
    steps_per_round: int
    noise_multiplier: float
    #: Noise of each evaluation release (one per round trained), or None: no releases.
    evaluation_noise_multiplier: float | None = None

    @property
    def total_steps(self) -> int:
        """Steps over the whole study."""
        return self.rounds * self.steps_per_round


class PrivateRound(NamedTuple):
    """The objects to train with during one private round (use these, not the originals)."""

    module: nn.Module
    optimizer: DPOptimizer
    #: Physical batches: the logical (Poisson) batches, split to ``max_physical_batch``.
    data_loader: DataLoader[Any]
    #: The loss to call (ghost clipping: Opacus' wrapper, whose ``backward()`` clips);
    #: ``None`` when the round was made without one.
    loss: Loss | None
    #: How Opacus computes the per-sample gradients this round.
    grad_sample_mode: GradSampleMode
    #: The step to take for an empty Poisson batch, instead of a forward and backward pass
    #: (:func:`site_node.privacy.modes.empty_step`).
    empty_step: Callable[[], None]


class DpTrainer:
    """DP-SGD for one site over one study, with a persistent privacy accountant.

    Args:
        privacy: the study's privacy target (per site, whole study).
        training: the study's training plan (rounds, local epochs, batch size).
        num_samples: size of the local training split.
        accountant: ``"prv"`` (default, tight) or ``"rdp"``.
        noise_multiplier: use this instead of computing it (for restoring saved state).
        secure_mode: noise robust to floating-point attacks: Opacus' own secure-mode noise
            (each draw the sum of four Gaussians, halved) from a generator seeded every
            round with 63 bits of the OS CSPRNG (:mod:`secrets`). Opacus' full
            ``secure_mode`` also draws the stream itself from ``torchcsprng``, which has no
            build for this PyTorch. The site turns it on (``dp_secure_noise``, required in
            production); off, noise comes from torch's default generator.

    Raises:
        PrivacyConfigurationError: the target cannot be met (budget too low) or the inputs
            are malformed.
    """

    def __init__(
        self,
        privacy: PrivacySpec,
        training: TrainingSpec,
        *,
        num_samples: int,
        accountant: AccountantMechanism = "prv",
        noise_multiplier: float | None = None,
        evaluation_noise_multiplier: float | None = None,
        secure_mode: bool = False,
    ) -> None:
        if accountant not in ("prv", "rdp"):
            raise PrivacyConfigurationError(f"unknown accountant {accountant!r}")
        if num_samples < 1:
            raise PrivacyConfigurationError("DP training needs at least one record")
        steps = step_plan(num_samples, training.batch_size)
        steps_per_epoch, sample_rate = steps.steps_per_epoch, steps.sample_rate
        self._loader_batches = steps.loader_batches
        steps_per_round = training.local_epochs * steps_per_epoch
        if evaluation_noise_multiplier is not None and not (
            math.isfinite(evaluation_noise_multiplier) and evaluation_noise_multiplier > 0
        ):
            raise PrivacyConfigurationError("evaluation noise must be a positive number")
        if noise_multiplier is None:
            try:
                if evaluation_noise_multiplier is None:
                    noise_multiplier = _noise_multiplier(
                        privacy.epsilon,
                        privacy.delta,
                        sample_rate,
                        training.rounds * steps_per_round,
                        accountant,
                    )
                else:
                    noise_multiplier = _noise_multiplier_with_releases(
                        privacy.epsilon,
                        privacy.delta,
                        sample_rate,
                        training.rounds * steps_per_round,
                        accountant,
                        float(evaluation_noise_multiplier),
                        training.rounds,
                    )
            except ValueError as exc:
                raise PrivacyConfigurationError(
                    f"epsilon {privacy.epsilon:g} at delta {privacy.delta:g} cannot be met "
                    f"for {training.rounds * steps_per_round} steps at sample rate "
                    f"{sample_rate:.4g}: {exc}",
                    hint="raise epsilon, or use fewer rounds/epochs or larger batches",
                ) from exc
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise PrivacyConfigurationError("noise multiplier must be a positive number")
        self.plan = DpPlan(
            mechanism=accountant,
            target_epsilon=float(privacy.epsilon),
            delta=float(privacy.delta),
            max_grad_norm=float(privacy.max_grad_norm),
            rounds=training.rounds,
            local_epochs=training.local_epochs,
            batch_size=training.batch_size,
            num_samples=num_samples,
            sample_rate=sample_rate,
            steps_per_epoch=steps_per_epoch,
            steps_per_round=steps_per_round,
            noise_multiplier=float(noise_multiplier),
            evaluation_noise_multiplier=(
                float(evaluation_noise_multiplier)
                if evaluation_noise_multiplier is not None
                else None
            ),
        )
        self.secure_mode = secure_mode
        self._accountant: IAccountant = create_accountant(mechanism=accountant)
        self.rounds_completed = 0
        #: Evaluation releases charged so far (one per round trained, charged with it).
        self.evaluations = 0

    # --- accounting -------------------------------------------------------------------------

    @property
    def noise_multiplier(self) -> float:
        """Noise multiplier used for every step of the study."""
        return self.plan.noise_multiplier

    @property
    def sample_rate(self) -> float:
        """Poisson sampling rate of every step."""
        return self.plan.sample_rate

    @property
    def history(self) -> tuple[HistoryEntry, ...]:
        """The accountant's ``(noise_multiplier, sample_rate, steps)`` history."""
        return tuple((float(s), float(q), int(n)) for s, q, n in self._accountant.history)

    @property
    def steps_taken(self) -> int:
        """DP-SGD steps recorded so far, across all rounds."""
        return sum(n for _, _, n in self.history)

    def _with_releases(
        self, history: tuple[HistoryEntry, ...], evaluations: int
    ) -> tuple[HistoryEntry, ...]:
        noise = self.plan.evaluation_noise_multiplier
        if noise is None or evaluations <= 0:
            return history
        return (*history, (noise, 1.0, evaluations))

    def epsilon_spent(self) -> float:
        """Epsilon (at the plan's delta) spent so far, training and evaluation releases
        composed; 0 before the first step."""
        full = self._with_releases(self.history, self.evaluations)
        return compute_epsilon(full, delta=self.plan.delta, mechanism=self.plan.mechanism)

    def epsilon_after_next_round(self) -> float:
        """Epsilon the history would reach after one more full round and its evaluation
        release (computed on a copy)."""
        projected = _append_steps(
            self.history, self.noise_multiplier, self.sample_rate, self.plan.steps_per_round
        )
        full = self._with_releases(projected, self.evaluations + 1)
        return compute_epsilon(full, delta=self.plan.delta, mechanism=self.plan.mechanism)

    def rounds_remaining(self) -> int:
        """Full rounds the plan still allows (by step count)."""
        return max(0, (self.plan.total_steps - self.steps_taken) // self.plan.steps_per_round)

    def check_round_allowed(self) -> None:
        """Raise :class:`PrivacyBudgetExhaustedError` if one more round would pass the target."""
        projected = self.epsilon_after_next_round()
        if projected > self.plan.target_epsilon + _EPS_SLACK:
            raise PrivacyBudgetExhaustedError(
                f"one more round would bring epsilon to {projected:.4f}, above the study's "
                f"target {self.plan.target_epsilon:g} (spent so far: "
                f"{self.epsilon_spent():.4f} after {self.rounds_completed} rounds)",
                hint="the study has used its privacy budget at this site",
            )

    # --- training ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def private_round(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader[Any],
        *,
        loss: Loss | None = None,
        grad_sample_mode: GradSampleMode | None = None,
        max_physical_batch: int | None = None,
    ) -> Iterator[PrivateRound]:
        """Wrap ``module``/``optimizer``/``data_loader`` for one private round.

        Checks the budget first. ``data_loader`` must iterate the full local training split
        with the plan's batch size. Every optimizer step inside the block is charged to the
        persistent accountant (also when the block raises). On exit the Opacus hooks are
        removed, so ``module`` (whose parameters were trained in place) is a plain model again.

        Args:
            loss: the training loss (mean over the batch); required for ghost clipping, which
                also needs it to return each record's loss with ``reduction = "none"``.
            grad_sample_mode: how Opacus computes per-sample gradients; by default the mode
                :mod:`site_node.privacy.modes` chose for ``module``'s catalogue network.
            max_physical_batch: process each logical batch in physical batches of at most
                this many records (Opacus' ``BatchMemoryManager``); accounting unchanged.
                Call ``optimizer.step()`` after every physical batch: it steps (and charges
                the accountant) only at the end of a logical batch.

        Raises:
            PrivacyBudgetExhaustedError: the round would exceed the target epsilon.
            DatasetMismatchError: the loader does not match the plan's dataset size/batching.
            PrivacyConfigurationError: ghost clipping without a per-record loss, an unknown
                mode, or a physical batch below 1.
        """
        if max_physical_batch is not None and max_physical_batch < 1:
            raise PrivacyConfigurationError(
                f"the largest physical batch must be 1 or more, got {max_physical_batch}"
            )
        self.check_round_allowed()
        n = len(data_loader.dataset)  # type: ignore[arg-type]
        if n != self.plan.num_samples or len(data_loader) != self._loader_batches:
            raise DatasetMismatchError(
                f"this DP plan is for {self.plan.num_samples} records in batches of "
                f"{self.plan.batch_size}; the data loader has {n} records in "
                f"{len(data_loader)} batches (expected {self._loader_batches})",
                hint="build the DpTrainer with the size of the training split you train on",
            )
        mode = grad_sample_mode or mode_for(module)
        with warnings.catch_warnings():
            # "Secure RNG turned off": Opacus' secure_mode needs torchcsprng (no build for
            # this PyTorch); `secure_mode` here is the closest real thing, set below.
            warnings.simplefilter("ignore", UserWarning)
            engine = PrivacyEngine(accountant=self.plan.mechanism, secure_mode=False)
        engine.accountant = self._accountant  # the hook steps our persistent accountant
        steps_before = self.steps_taken
        generator = None
        if self.secure_mode:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        private = make_private(
            engine,
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            mode=mode,
            loss=loss,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.plan.max_grad_norm,
            poisson_sampling=True,
            noise_generator=generator,
        )
        if self.secure_mode:
            # Opacus' floating-point-attack mitigation (2n Gaussian draws, n = 2) on the
            # OS-seeded generator: what secure_mode does, less the CSPRNG stream itself.
            private.optimizer.secure_mode = True
        if len(private.data_loader) != self.plan.steps_per_epoch:  # pragma: no cover
            private.module.cleanup()  # (only if Opacus changed how it plans an epoch)
            raise PrivacyConfigurationError(
                f"Opacus plans {len(private.data_loader)} steps per epoch, this plan "
                f"{self.plan.steps_per_epoch}: the accounting would not match the training"
            )
        try:
            with contextlib.ExitStack() as stack:
                loader = private.data_loader
                if max_physical_batch is not None:
                    loader = stack.enter_context(
                        BatchMemoryManager(
                            data_loader=loader,
                            max_physical_batch_size=max_physical_batch,
                            optimizer=private.optimizer,
                        )
                    )
                yield PrivateRound(
                    private.module,
                    private.optimizer,
                    loader,
                    private.loss,
                    mode,
                    functools.partial(empty_step, private.optimizer),
                )
        finally:
            private.module.cleanup()
            for p in module.parameters():
                p.grad = None
            if self.steps_taken - steps_before >= self.plan.steps_per_round:
                self.rounds_completed += 1
            if self.steps_taken > steps_before and self.plan.evaluation_noise_multiplier:
                # The round's evaluation release is charged now, with the training it
                # scores: the release may come later (another process) or never, but the
                # accountant and the spend report never hold less than may be released.
                self.evaluations += 1

    # --- persistence ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: format, plan, accountant history and rounds completed."""
        return {
            "format": STATE_FORMAT,
            "version": _STATE_VERSION,
            "plan": asdict(self.plan),
            "history": [list(entry) for entry in self.history],
            "rounds_completed": self.rounds_completed,
            "evaluations": self.evaluations,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict` for the same plan.

        Raises:
            AccountantStateError: malformed state, or state of another plan (study/dataset).
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise AccountantStateError("not a saved DP trainer state")
        if state.get("version") != _STATE_VERSION:
            raise AccountantStateError(f"unsupported state version {state.get('version')!r}")
        saved_plan = state.get("plan")
        mine = asdict(self.plan)
        if not isinstance(saved_plan, Mapping) or set(saved_plan) != set(mine):
            raise AccountantStateError("saved state has no valid plan")
        differing = sorted(k for k in mine if saved_plan[k] != mine[k])
        if differing:
            raise AccountantStateError(
                f"saved state belongs to another DP plan (differs in: {', '.join(differing)})",
                hint="the study contract or the dataset changed; do not reuse this state",
            )
        history = _parse_history(state.get("history"), self.plan)
        rounds = state.get("rounds_completed")
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise AccountantStateError("saved state has an invalid rounds_completed")
        evaluations = state.get("evaluations")
        if not isinstance(evaluations, int) or isinstance(evaluations, bool) or evaluations < 0:
            raise AccountantStateError("saved state has an invalid evaluations count")
        self._accountant.load_state_dict(
            {"history": list(history), "mechanism": self.plan.mechanism}
        )
        self.rounds_completed = rounds
        self.evaluations = evaluations

    def save(self, path: Path | str) -> None:
        """Write :meth:`state_dict` to ``path`` as JSON, atomically (temp file + rename)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self.state_dict(), indent=2, sort_keys=True, allow_nan=False)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, secure_mode: bool = False) -> DpTrainer:
        """A trainer rebuilt from saved state alone (no noise-multiplier search)."""
        plan = state.get("plan") if isinstance(state, Mapping) else None
        if not isinstance(plan, Mapping):
            raise AccountantStateError("not a saved DP trainer state")
        try:
            trainer = cls(
                PrivacySpec(
                    epsilon=plan["target_epsilon"],
                    delta=plan["delta"],
                    max_grad_norm=plan["max_grad_norm"],
                ),
                TrainingSpec(
                    rounds=plan["rounds"],
                    local_epochs=plan["local_epochs"],
                    batch_size=plan["batch_size"],
                ),
                num_samples=plan["num_samples"],
                accountant=plan["mechanism"],
                noise_multiplier=plan["noise_multiplier"],
                evaluation_noise_multiplier=plan["evaluation_noise_multiplier"],
                secure_mode=secure_mode,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AccountantStateError(f"saved plan is malformed: {type(exc).__name__}") from exc
        trainer.load_state_dict(state)
        return trainer

    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        privacy: PrivacySpec | None = None,
        training: TrainingSpec | None = None,
        num_samples: int | None = None,
        evaluation_noise_multiplier: float | Literal["any"] | None = "any",
        secure_mode: bool = False,
    ) -> DpTrainer:
        """Rebuild a trainer saved with :meth:`save`.

        When ``privacy``/``training``/``num_samples`` are given, the saved plan must match
        them (so a changed contract or dataset cannot reuse an old history).

        Raises:
            AccountantStateError: unreadable file, malformed state, or a plan mismatch.
        """
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AccountantStateError(
                f"cannot read DP state {Path(path).name!r}: {type(exc).__name__}"
            ) from exc
        trainer = cls.from_state_dict(state, secure_mode=secure_mode)
        expected: dict[str, object] = {}
        if privacy is not None:
            expected |= {
                "target_epsilon": float(privacy.epsilon),
                "delta": float(privacy.delta),
                "max_grad_norm": float(privacy.max_grad_norm),
            }
        if training is not None:
            expected |= {
                "rounds": training.rounds,
                "local_epochs": training.local_epochs,
                "batch_size": training.batch_size,
            }
        if num_samples is not None:
            expected["num_samples"] = num_samples
        if evaluation_noise_multiplier != "any":
            expected["evaluation_noise_multiplier"] = evaluation_noise_multiplier
        plan = asdict(trainer.plan)
        differing = sorted(k for k, v in expected.items() if plan[k] != v)
        if differing:
            raise AccountantStateError(
                f"saved DP state does not match this study/dataset (differs in: "
                f"{', '.join(differing)})"
            )
        return trainer


def _parse_history(raw: object, plan: DpPlan) -> tuple[HistoryEntry, ...]:
    if not isinstance(raw, list):
        raise AccountantStateError("saved history is not a list")
    out: list[HistoryEntry] = []
    for entry in raw:
        if not (isinstance(entry, list | tuple) and len(entry) == 3):
            raise AccountantStateError("saved history entry is malformed")
        noise, rate, steps = entry
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise AccountantStateError("saved history has an invalid step count")
        if noise != plan.noise_multiplier or rate != plan.sample_rate:
            raise AccountantStateError("saved history holds steps of another plan")
        out.append((float(noise), float(rate), int(steps)))
    return tuple(out)
