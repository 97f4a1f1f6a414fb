"""The site's Flower ClientApp: local DP training and encrypted, weighted updates.

``app`` is what the app bundle's ``[tool.flwr.app.components] clientapp`` names; the code
is this installed package, never code shipped in a bundle (see
:mod:`site_node.federation.processes`). Every message passes :class:`ContractGuardMod`
first. Node config (``flower-supernode --node-config``):

* ``site-id``: this site's id in the consortium;
* ``state-dir``: the site's state dir (approvals, study keys, accountant state);
* ``datasets-file``: YAML list of the site's :class:`~site_node.data.DatasetConfig`.

train: check and decrypt the previous round's aggregate (:mod:`site_node.federation.aggregates`:
its manifest of signed contributions, this site's own contribution in it, its integrity
tags), or build the contract's model from its fixed seed in round 1; train with Opacus
DP-SGD, multiply by the local sample count and encrypt with the study's CKKS key, tagged as
this site's contribution; reply the ciphertexts, plain metadata (sample count, epsilon
spent, the accountant's plan, timings), the contribution signed with the site's key (study,
contract, run, round, update digest, weight) and the signed spend report the ledger charges
(:mod:`concord_protocol.spend_reports`). evaluate: check and decrypt the round's new aggregate the
same way and score it on the local test split, once per round. The training loss is not
sent (not privatised). Logs carry counts and codes only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from concord_protocol.catalogue import check_task
from concord_protocol.contract import StudyContract
from concord_protocol.contributions import Contribution, sign_contribution
from concord_protocol.errors import CryptoError
from concord_protocol.spend_reports import SpendReport, sign_spend_report
from concord_protocol.wire.format import CKKS_TAG_SLOTS, RoundInfo, UpdateHeader, sha256_hex
from concord_protocol.wire.messages import (
    REC_CONFIG,
    REC_GLOBAL,
    REC_METRICS,
    REC_SITE,
    REC_UPDATE,
    arrays_to_blobs,
    blobs_to_arrays,
)
from site_node.crypto.codecs import DEFAULT_MAX_SITES, CkksCodec, PlainCodec, UpdateCodec
from site_node.crypto.sealing import SiteKeyPair
from site_node.data.cache import shared_cache
from site_node.data.dataset import LocalDataset, Split
from site_node.data.registry import DatasetConfig, load_dataset
from site_node.errors import DatasetError, MessageRefusedError
from site_node.federation.aggregates import (
    AggregateRefusedError,
    OpenedAggregate,
    RoundLedger,
    open_aggregate,
    roster_keys,
)
from site_node.federation.approvals import ApprovalStore
from site_node.federation.mods import ContractGuardMod
from site_node.federation.replies import CachedReply, ReplyCache, global_digest
from site_node.peers import PeerStore
from site_node.privacy.dp import DpTrainer
from site_node.privacy.dp_metrics import noisy_histogram
from site_node.settings import SiteSettings
from site_node.training.baseline import pool
from site_node.training.catalogue import build_model
from site_node.training.device import resolve_device
from site_node.training.loops import TrainResult, train_round
from site_node.training.params import flatten, num_parameters, unflatten_into

__all__ = [
    "MODEL_SEED",
    "FederationError",
    "SiteRuntime",
    "app",
    "load_site_datasets",
    "open_global",
    "site_settings",
]

log = logging.getLogger("concord.federation.site")

#: Seed of the round-1 model: every site builds bit-identical initial weights.
MODEL_SEED = 0


class FederationError(MessageRefusedError):
    """A message this site cannot serve; ``code`` is stable and leads the error reply."""


def site_settings(context: Context) -> SiteSettings:
    """The site's settings from the SuperNode's node config."""
    cfg = context.node_config
    datasets = str(cfg.get("datasets-file", ""))
    return SiteSettings(
        site_id=str(cfg["site-id"]),
        state_dir=Path(str(cfg["state-dir"])),
        datasets_file=Path(datasets) if datasets else None,
    )


def _store(context: Context) -> ApprovalStore:
    return ApprovalStore(site_settings(context).state_dir)


def load_site_datasets(path: Path) -> dict[str, DatasetConfig]:
    """Parse the site's datasets file: a YAML list (or ``{datasets: [...]}``) of configs."""
    raw = yaml.safe_load(path.read_text())
    items = raw.get("datasets", []) if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise FederationError("datasets file must hold a list", code="site.datasets_file")
    configs = [DatasetConfig.model_validate(item) for item in items]
    return {c.id: c for c in configs}


@dataclass
class SiteRuntime:
    """What one message needs at this site: settings, the approved contract, the codec."""

    settings: SiteSettings
    store: ApprovalStore
    study_id: str
    contract_hash: str
    contract: StudyContract
    codec: UpdateCodec
    key_fingerprint: str
    signing_key: Ed25519PrivateKey
    roster_keys: dict[str, str]
    attempt: str

    @property
    def ledger(self) -> RoundLedger:
        """What this site sent and answered in the study."""
        return RoundLedger(self.settings.state_dir, self.study_id, self.contract_hash)

    @property
    def device(self) -> torch.device:
        """Where this site trains and scores (``CONCORD_SITE_DEVICE``; refused if absent)."""
        return resolve_device(self.settings.device)

    @classmethod
    def from_context(cls, context: Context) -> SiteRuntime:
        """Build it from the run and node config (the guard mod has checked the contract)."""
        settings = site_settings(context)
        store = ApprovalStore(settings.state_dir)
        contract_hash = str(context.run_config["contract-hash"])
        approved = store.get(contract_hash)
        if approved is None:
            raise FederationError("no approval for this contract", code="contract.not_approved")
        codec: UpdateCodec
        fingerprint = ""
        if approved.contract.encryption.enabled:
            key = store.study_key(approved.study_id)
            if key is None:
                raise FederationError("this site has no key for the study yet", code="study.no_key")
            # The overflow guard must hold for the sum of every site in the study.
            study_sites = [s for s in str(context.run_config.get("sites", "")).split(",") if s]
            codec = CkksCodec(
                key.secret_context,
                max_sites=max(DEFAULT_MAX_SITES, len(study_sites)),
                tag_slots=CKKS_TAG_SLOTS,
                scheme=approved.contract.encryption.scheme,
            )
            fingerprint = key.key_fingerprint
        else:
            codec = PlainCodec()
        try:
            keys = SiteKeyPair.load(settings.keys_dir())
        except (OSError, ValueError, CryptoError) as exc:
            raise FederationError(
                f"the site's signing key cannot be read ({type(exc).__name__}): replies "
                "must be signed",
                code="site.no_signing_key",
            ) from None
        return cls(
            settings,
            store,
            approved.study_id,
            contract_hash,
            approved.contract,
            codec,
            fingerprint,
            keys.signing_key,
            roster_keys(
                approved.contract,
                site_id=str(settings.site_id),
                own_signing_key=keys.signing_public_b64,
                peers=PeerStore(settings.state_dir),
            ),
            str(context.run_config.get("attempt", "0" * 32)),
        )

    def dataset(self, split: Split) -> LocalDataset:
        """The site's data for the study's datasets (pooled when it holds several), with
        the contract's declared preprocessing, through this process's record cache
        (``data_cache_*`` settings); a data error is refused with its ``data.*`` code."""
        if self.settings.datasets_file is None:
            raise FederationError("no datasets file configured", code="site.no_datasets")
        configs = load_site_datasets(self.settings.datasets_file)
        mine = [configs[d] for d in self.contract.datasets if d in configs]
        if not mine:
            raise FederationError(
                "none of the study's datasets is here", code="site.no_study_dataset"
            )
        spec = self.contract.preprocessing
        cache = shared_cache(
            self.settings.data_cache_max_bytes,
            directory=self.settings.data_cache_dir,
            directory_max_bytes=self.settings.data_cache_dir_max_bytes,
        )
        try:
            parts = [load_dataset(c, split=split, preprocessing=spec, cache=cache) for c in mine]
        except DatasetError as exc:
            # The code leads the error reply (the ServerApp records it), the message names
            # the file or field; a data error is the site's to fix, never the study's.
            raise FederationError(exc.message, code=exc.code, hint=exc.hint) from exc
        fixed = spec.output_spatial_shape()
        for config, part in zip(mine, parts, strict=True):
            if fixed is not None and part.input_shape[1:] != fixed:
                raise FederationError(
                    f"dataset {config.id!r} gives records of shape {list(part.input_shape)}; "
                    f"the study's preprocessing fixes {list(fixed)}",
                    code="data.preprocessing_mismatch",
                )
        return parts[0] if len(parts) == 1 else pool(parts)

    def model_for(self, dataset: LocalDataset) -> nn.Module:
        """The contract's model, built from the fixed seed (refused unless it is a model of
        the contract's task)."""
        check_task(self.contract.model, self.contract.task)
        return build_model(
            self.contract.model,
            input_shape=dataset.input_shape,
            num_classes=dataset.num_classes,
            seed=MODEL_SEED,
        )

    def train_locally(
        self, start: Callable[[int], npt.NDArray[np.float64] | None]
    ) -> tuple[nn.Module, TrainResult, DpTrainer]:
        """One local round: the contract's model from ``start(num_params)`` (``None``: the
        seeded initial weights), trained with DP-SGD on the train split; the study's
        accountant state at this site is loaded before and saved after."""
        data = self.dataset("train")
        model = self.model_for(data)
        vector = start(num_parameters(model))
        if vector is not None:
            unflatten_into(model, vector)
        dp_path = self.store.dp_state_path(self.study_id, self.contract_hash)
        privacy, training = self.contract.privacy, self.contract.training
        eval_noise = self.contract.evaluation_noise()
        if dp_path.is_file():
            dp = DpTrainer.load(
                dp_path,
                privacy=privacy,
                training=training,
                num_samples=len(data),
                evaluation_noise_multiplier=eval_noise,
                secure_mode=self.settings.dp_secure_noise,
            )
        else:
            dp = DpTrainer(
                privacy,
                training,
                num_samples=len(data),
                evaluation_noise_multiplier=eval_noise,
                secure_mode=self.settings.dp_secure_noise,
            )
        try:
            result = train_round(
                model, data, training, dp=dp, device=self.device, task=self.contract.task
            )
        finally:
            dp.save(dp_path)  # steps taken are spent, also when the round raised
        return model, result, dp

    def site_record(self, contribution: str = "", spend_report: str = "") -> ConfigRecord:
        """The plain identity part of every reply (and a train reply's signed contribution
        and spend report)."""
        record: dict[str, Any] = {
            "site-id": str(self.settings.site_id),
            "key-fingerprint": self.key_fingerprint,
        }
        if contribution:
            record["contribution"] = contribution
        if spend_report:
            record["spend-report"] = spend_report
        return ConfigRecord(record)

    def evaluation_noise(self) -> float:
        """The contract's noise of each evaluation release; ``evaluation.not_in_contract``
        when the contract releases none."""
        noise = self.contract.evaluation_noise()
        if noise is None:
            raise FederationError(
                "the study's contract releases no evaluation", code="evaluation.not_in_contract"
            )
        return noise

    def release_evaluation(self, model: nn.Module, data: LocalDataset) -> dict[str, Any]:
        """The one thing that leaves about the test split: ``model``'s noisy histogram on
        ``data`` with its layout and noise level, as an evaluate reply's metrics."""
        noise, bins = self.evaluation_noise(), self.contract.evaluation.score_bins
        released = noisy_histogram(model, data, bins=bins, noise=noise, device=self.device)
        return {
            "histogram": released.counts,
            "num-classes": released.num_classes,
            "score-bins": bins,
            "noise-multiplier": noise,
        }

    def spend_report(self, round_number: int, metrics: dict[str, Any]) -> str:
        """This site's signed spend report after ``round_number`` (JSON; ``""`` for a
        cached reply of an older version that lacks the accountant's figures)."""
        try:
            report = SpendReport(
                study_id=self.study_id,
                contract_hash=self.contract_hash,
                attempt=self.attempt,
                round_number=round_number,
                site_id=str(self.settings.site_id),
                epsilon=float(metrics["epsilon"]),
                delta=float(self.contract.privacy.delta),
                noise_multiplier=float(metrics["noise-multiplier"]),
                sample_rate=float(metrics["sample-rate"]),
                steps=int(metrics["steps-total"]),
                num_samples=int(metrics["num-examples"]),
                evaluations=int(metrics.get("evaluations", 0)),
                evaluation_noise_multiplier=(
                    float(metrics["evaluation-noise"]) if "evaluation-noise" in metrics else None
                ),
            )
        except (KeyError, TypeError, ValueError):
            return ""
        return sign_spend_report(report, self.signing_key).to_json()

    def sign(self, round_number: int, update_digest: str, weight: int) -> str:
        """This site's signed contribution to ``round_number`` (JSON)."""
        contribution = Contribution(
            study_id=self.study_id,
            contract_hash=self.contract_hash,
            attempt=self.attempt,
            round_number=round_number,
            site_id=str(self.settings.site_id),
            update_digest=update_digest,
            weight=weight,
        )
        return sign_contribution(contribution, self.signing_key).to_json()


def open_global(
    runtime: SiteRuntime, content: RecordDict, num_params: int | None, *, round_number: int
) -> OpenedAggregate | None:
    """The verified aggregate of ``round_number`` sent with a message (``None`` when the
    message carries none); :class:`AggregateRefusedError` if it does not check out.
    ``num_params``: the model's size (``None``: as the aggregate's header says; the model
    built from it checks the size again)."""
    config = content.config_records[REC_CONFIG]
    if not bool(config.get("has-global", False)):
        return None
    try:
        blobs = arrays_to_blobs(content.array_records[REC_GLOBAL])
        global_round = int(str(config["global-round"]))
        total = float(config["total-weight"])  # type: ignore[arg-type]
        size = (
            num_params if num_params is not None else UpdateHeader.from_bytes(blobs[0]).num_params
        )
    except (KeyError, TypeError, ValueError, IndexError, CryptoError):
        raise FederationError("the aggregate is malformed", code="update.global_mismatch") from None
    if global_round != round_number:
        raise AggregateRefusedError(
            f"the aggregate sent is round {global_round}'s, not round {round_number}'s",
            code="aggregate.wrong_round",
        )
    return open_aggregate(
        blobs,
        manifest_json=str(config.get("manifest", "")),
        total_weight=total,
        round_number=round_number,
        contract=runtime.contract,
        contract_hash=runtime.contract_hash,
        study_id=runtime.study_id,
        site_id=str(runtime.settings.site_id),
        num_params=size,
        codec=runtime.codec,
        keys=runtime.roster_keys,
        ledger=runtime.ledger,
    )


def _previous(
    runtime: SiteRuntime, content: RecordDict, round_number: int
) -> OpenedAggregate | None:
    """What ``round_number`` starts from: the verified aggregate of the round before, or
    ``None`` (the seeded initial model) in round 1. Checked before anything else, the
    reply cache included: the site uses no aggregate it has not verified."""
    opened = open_global(runtime, content, None, round_number=round_number - 1)
    if opened is None and round_number > 1:
        raise AggregateRefusedError(
            f"round {round_number} needs the aggregate of round {round_number - 1}",
            code="aggregate.manifest_missing",
        )
    return opened


def _refused(runtime: SiteRuntime, kind: str, exc: AggregateRefusedError) -> None:
    """Log a refused aggregate at the site (the error reply tells the server)."""
    log.warning("study %s: refused to %s on an aggregate: %s", runtime.study_id, kind, exc.code)


def _train(msg: Message, context: Context) -> Message:
    runtime = SiteRuntime.from_context(context)
    config = msg.content.config_records[REC_CONFIG]
    round_number = int(config["round"])  # type: ignore[arg-type]
    received = time.monotonic()
    try:
        previous = _previous(runtime, msg.content, round_number)
    except AggregateRefusedError as exc:
        _refused(runtime, "train", exc)
        raise
    cache = ReplyCache(runtime.settings.state_dir, runtime.study_id, runtime.contract_hash)
    asked = _request_digest(msg.content)
    with cache.exclusive():
        cached = cache.get(round_number, asked)
        if cached is not None:  # a resumed round asked again: no second privacy spend
            log.info("study %s round %d: answered again", runtime.study_id, round_number)
            blobs, metrics = cached.blobs, cached.metrics
        else:
            blobs, metrics = _train_fresh(runtime, round_number, previous)
            cache.put(CachedReply(round_number, asked, blobs, metrics))
    digest = _header_digest(blobs)
    # Sent in good time (within half the round's timeout): the aggregate must list it.
    timely = time.monotonic() - received <= runtime.contract.federation.round_timeout_s / 2
    runtime.ledger.record_contribution(round_number, digest, timely=timely)
    signed = runtime.sign(round_number, digest, int(metrics["num-examples"]))
    spend = runtime.spend_report(round_number, metrics)
    return _train_reply(msg, runtime, blobs, metrics, signed, spend)


def _start_from(
    previous: OpenedAggregate | None, num_params: int
) -> npt.NDArray[np.float64] | None:
    if previous is None:
        return None
    if previous.params.shape[0] != num_params:
        raise FederationError(
            f"the aggregate holds {previous.params.shape[0]} parameters, the model {num_params}",
            code="update.global_mismatch",
        )
    return previous.params


def _train_fresh(
    runtime: SiteRuntime, round_number: int, previous: OpenedAggregate | None
) -> tuple[tuple[bytes, ...], dict[str, Any]]:
    """Train the round with DP and encrypt the weighted update: its blobs and metrics."""
    t0 = time.perf_counter()
    model, result, dp = runtime.train_locally(lambda n: _start_from(previous, n))
    n_params = num_parameters(model)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = RoundInfo(
        runtime.study_id, runtime.contract_hash, round_number, n_params, runtime.codec.tag_slots
    )
    update = runtime.codec.encode(
        flatten(model),
        weight=float(result.num_samples),
        info=info,
        site_id=str(runtime.settings.site_id),
    )
    encrypt_s = time.perf_counter() - t0
    log.info(
        "study %s round %d: trained on %d records, %d steps",
        runtime.study_id,
        round_number,
        result.num_samples,
        result.steps,
    )
    metrics: dict[str, Any] = {
        "num-examples": int(result.num_samples),
        "epsilon": float(result.epsilon_spent if result.epsilon_spent is not None else -1.0),
        "noise-multiplier": float(dp.noise_multiplier),
        "sample-rate": float(dp.sample_rate),
        "steps-total": int(dp.steps_taken),
        "evaluations": int(dp.evaluations),
        "train-seconds": train_s,
        "encrypt-seconds": encrypt_s,
    }
    if dp.plan.evaluation_noise_multiplier is not None:
        metrics["evaluation-noise"] = float(dp.plan.evaluation_noise_multiplier)
    return tuple(update.to_bytes_list()), metrics


def _request_digest(content: RecordDict) -> str:
    """Which global model a train request carries (see :mod:`site_node.federation.replies`)."""
    config = content.config_records[REC_CONFIG]
    if not bool(config.get("has-global", False)):
        return global_digest(None, round_number=0, total_weight=0.0)
    return global_digest(
        arrays_to_blobs(content.array_records[REC_GLOBAL]),
        round_number=int(str(config["global-round"])),
        total_weight=float(config["total-weight"]),  # type: ignore[arg-type]
    )


def _header_digest(blobs: tuple[bytes, ...]) -> str:
    """The update digest of a reply's blobs (the SHA-256 of its header blob)."""
    return sha256_hex(bytes(blobs[0]))


def _train_reply(
    msg: Message,
    runtime: SiteRuntime,
    blobs: tuple[bytes, ...],
    metrics: dict[str, Any],
    contribution: str,
    spend_report: str,
) -> Message:
    content = RecordDict(
        {
            REC_UPDATE: blobs_to_arrays(blobs),
            REC_METRICS: MetricRecord(metrics),
            REC_SITE: runtime.site_record(contribution, spend_report),
        }
    )
    return Message(content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    runtime = SiteRuntime.from_context(context)
    runtime.evaluation_noise()  # refused first when the contract releases no evaluation
    data = runtime.dataset("test")
    model = runtime.model_for(data)
    round_number = int(msg.content.config_records[REC_CONFIG]["round"])  # type: ignore[arg-type]
    try:
        if runtime.ledger.contribution(round_number) is None:
            # The release of a round is charged when the site trains it: a round this site
            # did not train has no release in its accountant, so it answers none.
            raise AggregateRefusedError(
                f"this site did not train round {round_number}: no evaluation is budgeted",
                code="evaluation.not_trained",
            )
        opened = open_global(runtime, msg.content, num_parameters(model), round_number=round_number)
    except AggregateRefusedError as exc:
        _refused(runtime, "evaluate", exc)
        raise
    if opened is None:
        raise FederationError("evaluate needs the aggregate", code="update.no_global")
    with runtime.ledger.evaluation(round_number, opened.digest) as slot:
        answer = slot.answered
        if answer is None:  # asked again for the same aggregate: the same noisy answer
            unflatten_into(model, opened.params)
            answer = runtime.release_evaluation(model, data)
            slot.answer(answer)
    return Message(
        RecordDict({REC_METRICS: MetricRecord(answer), REC_SITE: runtime.site_record()}),
        reply_to=msg,
    )


app = ClientApp(mods=[ContractGuardMod(_store)])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally with DP, reply the encrypted weighted update and plain metadata."""
    return _train(msg, context)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the decrypted aggregate on the local test split."""
    return _evaluate(msg, context)
