"""Train replies as a site's ClientApp makes them, for tests that craft replies by hand."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from concord_protocol.contributions import Contribution, sign_contribution
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
) -> Message:
    """A train reply as the site's ClientApp makes it, its contribution signed with the
    test key of ``signed_as`` (default: ``site``)."""
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
    content = RecordDict(
        {
            "update": blobs_to_arrays(blobs),
            "metrics": MetricRecord({"num-examples": n, "epsilon": 0.5}),
            "site": ConfigRecord(
                {
                    "site-id": site,
                    "key-fingerprint": "f" * 64,
                    "contribution": contribution.to_json(),
                }
            ),
        }
    )
    return Message(content, reply_to=request)
