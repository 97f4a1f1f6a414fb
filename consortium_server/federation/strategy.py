"""Blind aggregation: build a round's messages, screen the replies, sum them unread.

Why not a subclass of Flower's ``FedAvg``: ``Strategy.start`` keeps going with the old
arrays when ``aggregate_train`` returns nothing, has no notion of a minimum number of valid
replies, and treats the global model as plaintext arrays the server holds. Here the server
never holds the model: the "global model" is the encrypted aggregate of the last round plus
the total weight, which the sites decrypt. So :class:`BlindAggregationStrategy` is a small
class of pure functions (build contents, check and aggregate replies, weigh metrics) and
:func:`consortium_server.federation.serverapp.run_study_rounds` is the round loop on
``grid.send_and_receive`` with the study's round timeout. The message layout is shared with
the sites (:mod:`concord_protocol.wire.messages`); the plan is
:mod:`~consortium_server.federation.plan`, the records :mod:`~consortium_server.federation.records`.

A reply counts only when it comes from the SuperNode the site enrolled (``wrong_node``
otherwise, checked before anything else about the site, so a rogue node cannot crowd the
real site out as a "duplicate"), and carries the site's signed contribution
(:mod:`concord_protocol.contributions`) for this study, contract, run attempt and round,
naming the update's digest and a weight within the site's roster entry. The aggregate goes
on with the manifest of the contributions it sums, which the sites check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from concord_protocol.contributions import AggregateManifest, ManifestError, SignedContribution
from concord_protocol.eval_histograms import metrics as histogram_metrics
from concord_protocol.rounds import RejectedReply, RoundRecord, SiteSpend
from concord_protocol.site_keys import SignatureError
from concord_protocol.spend_reports import SignedSpendReport, SpendReportError
from concord_protocol.wire.ckks import context_info, load_context
from concord_protocol.wire.format import (
    CKKS_TAG_SLOTS,
    PLAIN_CHUNK_SIZE,
    RoundInfo,
    expected_chunks,
    sha256_hex,
)
from concord_protocol.wire.messages import (
    REC_CONFIG,
    REC_GLOBAL,
    REC_METRICS,
    REC_SITE,
    REC_UPDATE,
    arrays_to_blobs,
    blobs_to_arrays,
)
from consortium_server.federation.blind_sum import (
    BlindSumResult,
    NotEnoughSitesError,
    blind_sum,
    plain_sum,
)
from consortium_server.federation.checkpoints import GlobalModel
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.records import RoundFailedError

__all__ = ["BlindAggregationStrategy", "SiteReply"]

# Extra reply reasons on top of blind_sum's (a reply that never reached blind_sum).
ERROR_REPLY = "error_reply"
MALFORMED_REPLY = "malformed_reply"
UNKNOWN_SITE = "unknown_site"
DUPLICATE_SITE = "duplicate_site"
BAD_WEIGHT = "bad_weight"
KEY_MISMATCH = "key_mismatch"
WRONG_NODE = "wrong_node"
UNTRUSTED_SITE = "untrusted_site"
BAD_CONTRIBUTION = "bad_contribution"


@dataclass(frozen=True)
class SiteReply:
    """Plain metadata of one accepted train reply."""

    site_id: str
    node_id: int
    num_examples: int
    epsilon: float | None
    train_seconds: float
    encrypt_seconds: float
    key_fingerprint: str
    contribution: SignedContribution | None = None


def _reject(site_id: str, reason: str, detail: str) -> RejectedReply:
    return RejectedReply(site_id=site_id, reason=reason, detail=detail[:2000])


class BlindAggregationStrategy:
    """Build round messages, check replies, sum updates blindly and weigh metrics."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        #: Which site each SuperNode spoke for in earlier valid replies (to name errors).
        self.node_sites: dict[int, str] = {}
        #: This round's verified spend reports and unusable ones, per site (reset per round).
        self._spend: dict[str, SiteSpend] = {}
        self._spend_problems: dict[str, str] = {}
        #: The contract's encryption scheme (``ckks`` or ``ckks_seeded``); unused when off.
        self.scheme = plan.contract.encryption.scheme
        if plan.public_context is not None:
            info = context_info(load_context(plan.public_context, require_secret=False))
            self.chunk_size = info.chunk_size(self.scheme)
            # Serialised CKKS ciphertext: 2 polynomials of N coefficients per data prime,
            # 8 bytes each, plus a header; primes are >= 20 bits, so this bounds it.
            primes = max(1, math.ceil(info.data_modulus_bits / 20))
            self.max_chunk_bytes = 2 * info.poly_modulus_degree * 8 * primes + 8192
        else:
            self.chunk_size = PLAIN_CHUNK_SIZE
            self.max_chunk_bytes = 8 * PLAIN_CHUNK_SIZE
        self.tag_slots = CKKS_TAG_SLOTS if plan.public_context is not None else 0
        self.expected_chunks = expected_chunks(
            self.round_info(1).num_values(self.chunk_size), self.chunk_size
        )

    # --- contents ---------------------------------------------------------------------

    def round_info(self, round_number: int) -> RoundInfo:
        """What a reply of ``round_number`` must declare."""
        p = self.plan
        return RoundInfo(p.study_id, p.contract_hash, round_number, p.num_params, self.tag_slots)

    def content(self, round_number: int, model: GlobalModel | None) -> RecordDict:
        """Train/evaluate content: round config plus the current aggregate, if any."""
        config = ConfigRecord(
            {
                "round": round_number,
                "study-id": self.plan.study_id,
                "contract-hash": self.plan.contract_hash,
                "total-weight": float(model.total_weight) if model else 0.0,
                "has-global": model is not None,
                "global-round": model.round_number if model else 0,
                "manifest": model.manifest if model else "",
            }
        )
        content = RecordDict({REC_CONFIG: config})
        if model is not None:
            content[REC_GLOBAL] = blobs_to_arrays(model.blobs)
        return content

    # --- train replies ----------------------------------------------------------------

    def _screen_reply(
        self,
        round_number: int,
        msg: Message,
        seen_sites: set[str],
        rejected: list[RejectedReply],
    ) -> tuple[SiteReply, list[bytes]] | None:
        node = msg.metadata.src_node_id
        label = self.node_sites.get(node, f"node-{node}")
        if msg.has_error():
            err = msg.error
            if "unavailable" in (err.reason or "").lower():
                # The SuperLink answers for a node that went away: the site is missing
                # (listed in missing_sites), not a site that sent a bad reply.
                return None
            rejected.append(
                _reject(label, ERROR_REPLY, f"code {err.code}: {(err.reason or '')[:300]}")
            )
            return None
        content = msg.content
        try:
            site_rec = content.config_records[REC_SITE]
            site_id = str(site_rec["site-id"])
            fingerprint = str(site_rec.get("key-fingerprint", ""))
            contribution_json = str(site_rec.get("contribution", ""))
        except (KeyError, TypeError, ValueError):
            rejected.append(_reject(label, MALFORMED_REPLY, "no site record"))
            return None
        if site_id not in self.plan.sites:
            rejected.append(_reject(label, UNKNOWN_SITE, f"{site_id!r} is not a study site"))
            return None
        enrolled = self.plan.node_sites
        if enrolled and enrolled.get(node) != site_id:
            # Before the duplicate check: a node that is not the site's cannot use up the
            # site's one reply.
            rejected.append(
                _reject(label, WRONG_NODE, f"node {node} is not {site_id}'s enrolled SuperNode")
            )
            return None
        # The site trained (and spent) once its node replies: its signed spend report is
        # charged whatever becomes of the update below.
        self._note_spend(
            round_number,
            site_id,
            str(site_rec.get("spend-report", "")),
            node_verified=bool(enrolled),
        )
        if site_id in seen_sites:
            rejected.append(_reject(site_id, DUPLICATE_SITE, f"second reply from node {node}"))
            return None
        try:
            metrics = content.metric_records[REC_METRICS]
            blobs = arrays_to_blobs(content.array_records[REC_UPDATE])
            raw_n = metrics["num-examples"]
            raw_eps = metrics.get("epsilon", -1.0)
            train_s = float(metrics.get("train-seconds", 0.0))  # type: ignore[arg-type]
            enc_s = float(metrics.get("encrypt-seconds", 0.0))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            rejected.append(_reject(site_id, MALFORMED_REPLY, f"missing or bad record: {exc}"))
            return None
        if (
            isinstance(raw_n, bool)
            or not isinstance(raw_n, int | float)
            or not math.isfinite(raw_n)
            or raw_n < 1
            or int(raw_n) != raw_n
        ):
            rejected.append(_reject(site_id, BAD_WEIGHT, "num-examples is not a positive integer"))
            return None
        limit = self.plan.max_examples(site_id)
        if limit is not None and int(raw_n) > limit:
            rejected.append(
                _reject(site_id, BAD_WEIGHT, f"weight {int(raw_n)} exceeds the roster's {limit}")
            )
            return None
        signed = self._contribution(round_number, site_id, int(raw_n), blobs, contribution_json)
        if isinstance(signed, RejectedReply):
            rejected.append(signed)
            return None
        # Only a reply that passed every check takes the site's one place in the round: a
        # bad one (a forged signature, say) cannot crowd the real reply out.
        seen_sites.add(site_id)
        self.node_sites[node] = site_id
        eps = float(raw_eps) if isinstance(raw_eps, int | float) else -1.0
        reply = SiteReply(
            site_id=site_id,
            node_id=node,
            num_examples=int(raw_n),
            epsilon=eps if math.isfinite(eps) and eps >= 0 else None,
            train_seconds=train_s,
            encrypt_seconds=enc_s,
            key_fingerprint=fingerprint,
            contribution=signed,
        )
        return reply, blobs

    def _note_spend(
        self, round_number: int, site_id: str, text: str, *, node_verified: bool
    ) -> None:
        """Keep the site's spend report for the ledger when it checks out (the first one of
        the round wins), else why it does not. A missing or bad report is noted only from
        the site's enrolled node (the ledger charges the site's whole study target for it):
        an unverified sender must not be able to spend a hospital's budget."""
        if site_id in self._spend:
            return
        problem = self._spend_problem(round_number, site_id, text)
        if problem is None:
            self._spend_problems.pop(site_id, None)
        elif node_verified:
            self._spend_problems[site_id] = problem

    def _spend_problem(self, round_number: int, site_id: str, text: str) -> str | None:
        """Record the reply's spend report if it checks out (None), else say why not."""
        if not text:
            return "the reply carries no spend report"
        try:
            signed = SignedSpendReport.from_json(text)
        except SpendReportError:
            return "the spend report does not parse"
        r, p = signed.report, self.plan
        wrong = [
            name
            for name, ok in (
                ("study", r.study_id == p.study_id),
                ("contract hash", r.contract_hash == p.contract_hash),
                ("run attempt", r.attempt == p.attempt),
                ("round", r.round_number == round_number),
                ("site", r.site_id == site_id),
            )
            if not ok
        ]
        if wrong:
            return f"the spend report names another {', '.join(wrong)}"
        if p.peers:
            peer = p.peer(site_id)
            try:
                if peer is None:
                    raise SignatureError("the plan holds no key for the site")
                signed.verify(peer.signing_public_key)
            except SignatureError as exc:
                return f"the spend report: {exc.message}"
        self._spend[site_id] = SiteSpend(**r.model_dump(include=set(SiteSpend.model_fields)))
        return None

    def _contribution(
        self, round_number: int, site_id: str, weight: int, blobs: Sequence[bytes], text: str
    ) -> SignedContribution | RejectedReply:
        """The reply's signed contribution, checked against the reply and the plan."""
        try:
            signed = SignedContribution.from_json(text)
        except ManifestError:
            return _reject(site_id, BAD_CONTRIBUTION, "no signed contribution")
        c = signed.contribution
        p = self.plan
        digest = sha256_hex(bytes(blobs[0])) if blobs else ""
        wrong = [
            name
            for name, ok in (
                ("study", c.study_id == p.study_id),
                ("contract hash", c.contract_hash == p.contract_hash),
                ("run attempt", c.attempt == p.attempt),
                ("round", c.round_number == round_number),
                ("site", c.site_id == site_id),
                ("update digest", c.update_digest == digest),
                ("weight", c.weight == weight),
            )
            if not ok
        ]
        if wrong:
            return _reject(site_id, BAD_CONTRIBUTION, f"it names another {', '.join(wrong)}")
        if p.peers:
            peer = p.peer(site_id)
            if peer is None:
                return _reject(site_id, UNTRUSTED_SITE, "the plan holds no key for the site")
            try:
                signed.verify(peer.signing_public_key)
            except SignatureError as exc:
                return _reject(site_id, BAD_CONTRIBUTION, exc.message)
        return signed

    def aggregate_train(
        self, round_number: int, replies: Iterable[Message], record: RoundRecord
    ) -> GlobalModel:
        """Check every reply, sum the valid ones blindly, fill ``record``.

        Bad replies are dropped with a record entry. Raises :class:`RoundFailedError` (with
        the record filled in) when fewer than ``plan.min_sites`` valid replies remain.
        """
        rejected: list[RejectedReply] = []
        seen: set[str] = set()
        screened: dict[str, tuple[SiteReply, list[bytes]]] = {}
        self._spend, self._spend_problems = {}, {}
        for msg in replies:
            screened_reply = self._screen_reply(round_number, msg, seen, rejected)
            if screened_reply is not None:
                screened[screened_reply[0].site_id] = screened_reply
        # Sites must share one study key (fingerprints are plain metadata; the majority
        # fingerprint wins, the others are dropped: their ciphertexts would not add up).
        fingerprints = [r.key_fingerprint for r, _ in screened.values()]
        if fingerprints and self.plan.public_context is not None:
            common = max(set(fingerprints), key=fingerprints.count)
            for site_id, (r, _) in list(screened.items()):
                if r.key_fingerprint != common:
                    rejected.append(_reject(site_id, KEY_MISMATCH, "another study key"))
                    del screened[site_id]
        updates = {site: blobs for site, (_, blobs) in screened.items()}
        t0 = time.perf_counter()
        try:
            result = self._sum(round_number, updates)
        except NotEnoughSitesError as exc:
            record.aggregate_seconds = time.perf_counter() - t0
            rejected.extend(exc.rejected)
            self._fill(record, screened, list(exc.accepted), rejected, None)
            record.status = "failed"
            record.failure = str(exc)
            raise RoundFailedError(str(exc), record) from None
        record.aggregate_seconds = time.perf_counter() - t0
        rejected.extend(result.rejected)
        total = float(sum(screened[s][0].num_examples for s in result.accepted))
        self._fill(record, screened, list(result.accepted), rejected, result)
        record.total_weight = total
        record.status = "aggregated"
        signed = [screened[s][0].contribution for s in result.accepted]
        manifest = AggregateManifest.of(
            [c for c in signed if c is not None],
            study_id=self.plan.study_id,
            contract_hash=self.plan.contract_hash,
            round_number=round_number,
        )
        return GlobalModel(
            round_number=round_number,
            blobs=tuple(result.to_bytes_list()),
            total_weight=total,
            digest=result.digest,
            manifest=manifest.to_json(),
        )

    def _sum(self, round_number: int, updates: Mapping[str, Sequence[bytes]]) -> BlindSumResult:
        kwargs: dict[str, Any] = {
            "expected": self.round_info(round_number),
            "expected_chunks": self.expected_chunks,
            "max_chunk_bytes": self.max_chunk_bytes,
            "min_sites": self.plan.min_sites,
        }
        if self.plan.public_context is None:
            return plain_sum(updates, chunk_size=self.chunk_size, **kwargs)
        return blind_sum(self.plan.public_context, updates, scheme=self.scheme, **kwargs)

    def _fill(
        self,
        record: RoundRecord,
        screened: Mapping[str, tuple[SiteReply, list[bytes]]],
        accepted: list[str],
        rejected: list[RejectedReply],
        result: BlindSumResult | None,
    ) -> None:
        record.participants = sorted(accepted)
        record.sample_counts = {s: screened[s][0].num_examples for s in record.participants}
        record.epsilon = {s: screened[s][0].epsilon for s in record.participants}
        record.spend = dict(sorted(self._spend.items()))
        record.spend_problems = dict(sorted(self._spend_problems.items()))
        record.site_train_seconds = {s: r.train_seconds for s, (r, _) in screened.items()}
        record.site_encrypt_seconds = {s: r.encrypt_seconds for s, (r, _) in screened.items()}
        record.rejected = rejected
        replied = set(screened) | {r.site_id for r in rejected}
        record.missing_sites = sorted(set(self.plan.sites) - replied)
        if result is not None:
            record.site_digests = dict(result.site_digests)
            record.aggregate_digest = result.digest

    # --- evaluate replies -------------------------------------------------------------

    def evaluation_refusals(self, replies: Iterable[Message]) -> list[RejectedReply]:
        """The sites' error replies to ``evaluate`` (a site refusing a forged aggregate)."""
        refusals = []
        for msg in replies:
            if msg.has_error():
                node = msg.metadata.src_node_id
                label = self.node_sites.get(node, f"node-{node}")
                err = msg.error
                refusals.append(
                    _reject(label, ERROR_REPLY, f"code {err.code}: {(err.reason or '')[:300]}")
                )
        return refusals

    def aggregate_evaluate(self, replies: Iterable[Message]) -> dict[str, float]:
        """The task's metrics (accuracy and AUC, or Dice and HD95) and the test count from
        the sum of the sites' noisy histograms.

        Each valid reply carries the histogram its site released under DP
        (:mod:`concord_protocol.eval_histograms`) in the contract's layout; the histograms
        are summed before any metric is read (the noise of each site averages out over the
        sum, and no per-site metric is computed). A reply of another layout, with
        non-finite counts or from a site that already answered, is skipped. Also returns
        ``sites`` and ``noise-sd``, the standard deviation of each summed cell's noise.
        """
        spec = self.plan.contract.evaluation
        task = self.plan.contract.task.kind
        total: list[float] | None = None
        layout: tuple[int, int] | None = None
        seen: set[str] = set()
        for msg in replies:
            if msg.has_error() or REC_METRICS not in msg.content.metric_records:
                continue
            metrics = msg.content.metric_records[REC_METRICS]
            site_rec = msg.content.config_records.get(REC_SITE)
            declared = str(site_rec.get("site-id", "")) if site_rec is not None else ""
            # The site a node spoke for in its train reply (verified there), not a claim.
            site_id = self.node_sites.get(msg.metadata.src_node_id, declared)
            if not site_id or site_id in seen:
                continue
            counts = metrics.get("histogram")
            num_classes = metrics.get("num-classes")
            if not isinstance(counts, list) or not isinstance(num_classes, int):
                continue
            try:
                values = [float(v) for v in counts]
                histogram_metrics(values, num_classes=num_classes, bins=spec.score_bins, task=task)
            except (TypeError, ValueError):
                continue
            if layout is not None and layout != (num_classes, len(values)):
                continue
            layout = (num_classes, len(values))
            seen.add(site_id)
            total = values if total is None else [a + b for a, b in zip(total, values, strict=True)]
        if total is None or layout is None:
            return {"sites": 0.0}
        out = histogram_metrics(total, num_classes=layout[0], bins=spec.score_bins, task=task)
        out["sites"] = float(len(seen))
        out["noise-sd"] = float(
            (self.plan.contract.evaluation_noise() or 0.0) * math.sqrt(len(seen))
        )
        return out
