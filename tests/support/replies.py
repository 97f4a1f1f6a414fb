"""Train replies as a site's ClientApp makes them, for tests that craft replies by hand."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from concord_protocol.contributions import Contribution, sign_contribution
from concord_protocol.spend_reports import SpendReport, sign_spend_report
from concord_protocol.wire.format import UpdateHeader, sha256_hex
from concord_protocol.wire.messages import blobs_to_arrays
from tests.support.roster import site_keys

__all__ = ["train_reply"]


def train_reply(
    site: str,
    node: int,
    blobs: list[bytes],
    n: int = 100,
    *,
    round_number: int = 1,
    signed_as: str | None = None,
    weight: int | None = None,
    attempt: str = "0" * 32,
    spend_epsilon: float | None = None,
) -> Message:
    """A train reply as the site's ClientApp makes it, its contribution signed with the
    test key of ``signed_as`` (default: ``site``); with ``spend_epsilon``, it carries a
    spend report of that cumulative epsilon signed with the same key."""
    request = Message(RecordDict(), dst_node_id=node, message_type="train", group_id="1")
    header = UpdateHeader.from_bytes(blobs[0]) if blobs else None
    contribution = sign_contribution(
        Contribution(
            study_id=header.study_id if header else "study-1",
            contract_hash=header.contract_hash if header else "0" * 64,
            attempt=attempt,
            round_number=round_number,
            site_id=site,
            update_digest=sha256_hex(blobs[0]) if blobs else "0" * 64,
            weight=weight if weight is not None else max(n, 1),
        ),
        site_keys(signed_as or site).signing_key,
    )
    site_record: dict[str, str] = {
        "site-id": site,
        "key-fingerprint": "f" * 64,
        "contribution": contribution.to_json(),
    }
    if spend_epsilon is not None:
        report = SpendReport(
            study_id=contribution.contribution.study_id,
            contract_hash=contribution.contribution.contract_hash,
            attempt=attempt,
            round_number=round_number,
            site_id=site,
            epsilon=spend_epsilon,
            delta=1e-5,
            noise_multiplier=1.1,
            sample_rate=0.25,
            steps=4,
            num_samples=max(n, 1),
        )
        signed = sign_spend_report(report, site_keys(signed_as or site).signing_key)
        site_record["spend-report"] = signed.to_json()
    content = RecordDict(
        {
            "update": blobs_to_arrays(blobs),
            "metrics": MetricRecord({"num-examples": n, "epsilon": 0.5}),
            "site": ConfigRecord(dict(site_record)),
        }
    )
    return Message(content, reply_to=request)
