"""The internal API the ServerApp reports rounds to (``/internal/v1/federation``).

Only the consortium's own ServerApp calls it, from the SuperLink's pod, with the federation
token (``Authorization: Bearer <token>``, the file named by
``CONCORD_FEDERATION__SERVERAPP_TOKEN_FILE``, compared in constant time). No user token is
accepted here and these routes are not for researchers' tools; the Helm chart's ingress
does not expose them. Every answer is committed before it is sent, so a ``continue`` is
never given for a round that was not recorded.

Routes (``{attempt}`` is the run attempt the server put in the run config):

* ``POST .../studies/{id}/runs/{attempt}/heartbeat``: the ServerApp is alive; the verdict
  says whether it should go on.
* ``PUT .../studies/{id}/runs/{attempt}/rounds/{n}/checkpoint?total_weight=W``: the
  round's encrypted aggregate, blobs length-prefixed (``application/vnd.concord.blobs``).
* ``POST .../studies/{id}/runs/{attempt}/rounds``: the round's record; the verdict.
* ``GET .../studies/{id}/runs/{attempt}/checkpoints/{n}``: a kept aggregate (a restarted
  run starts from the last recorded round's).
* ``POST .../studies/{id}/runs/{attempt}/failure``: the ServerApp stopped on an error.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response

from concord_protocol.wire.format import EncodedUpdate
from consortium_server.api.deps import SessionDep
from consortium_server.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
)
from consortium_server.federation import round_gate
from consortium_server.federation.checkpoints import (
    GlobalModel,
    pack_checkpoint,
    unpack_checkpoint,
)
from consortium_server.federation.run_messages import (
    CHECKPOINT_MEDIA_TYPE,
    RoundReport,
    RunFailure,
    RunVerdict,
)

__all__ = ["SERVERAPP_SUBJECT", "router"]

#: Who the audit log names as the actor of what the ServerApp reports.
SERVERAPP_SUBJECT = "system:serverapp"


def require_serverapp(request: Request) -> None:
    """Admit only a caller holding the federation token. A server without a SuperLink has
    no internal API: 404 ``federation.disabled`` (a ServerApp pointed at it is misconfigured,
    and retrying would not help)."""
    expected = getattr(request.app.state, "serverapp_token", None)
    if expected is None:
        raise NotFoundError(
            "Runs are disabled on this server: no SuperLink or federation token is configured.",
            code="federation.disabled",
        )
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Send the federation token.", code="auth.missing_token")
    if not hmac.compare_digest(token.strip().encode(), expected.get_secret_value().encode()):
        raise AuthenticationError("This is not the federation token.", code="auth.invalid_token")


router = APIRouter(
    prefix="/internal/v1/federation/studies/{study_id}/runs/{attempt}",
    tags=["internal"],
    dependencies=[Depends(require_serverapp)],
    include_in_schema=True,
)

StudyId = Annotated[str, Path(min_length=1, max_length=64)]
Attempt = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
Round = Annotated[int, Path(ge=1, le=100_000)]


@router.post("/heartbeat")
def post_heartbeat(study_id: StudyId, attempt: Attempt, session: SessionDep) -> RunVerdict:
    """The ServerApp is alive; should it go on?"""
    return round_gate.heartbeat(session, study_id, attempt)


@router.put("/rounds/{round_number}/checkpoint")
def put_checkpoint(
    study_id: StudyId,
    attempt: Attempt,
    round_number: Round,
    body: Annotated[bytes, Body(media_type=CHECKPOINT_MEDIA_TYPE)],
    session: SessionDep,
    total_weight: Annotated[float, Query(gt=0, allow_inf_nan=False)],
) -> RunVerdict:
    """Keep the round's encrypted aggregate before the round is reported."""
    manifest, blobs = unpack_checkpoint(body)
    update = EncodedUpdate.from_bytes_list(blobs)
    if update.header.round_number != round_number or update.header.study_id != study_id:
        raise InvalidRequestError(
            "The checkpoint's header names another round or study.", code="update.header_mismatch"
        )
    model = GlobalModel(round_number, tuple(blobs), total_weight, update.digest, manifest)
    return round_gate.put_checkpoint(session, study_id, attempt, model)


@router.post("/rounds")
def post_round(
    study_id: StudyId,
    attempt: Attempt,
    body: RoundReport,
    request: Request,
    session: SessionDep,
) -> RunVerdict:
    """Record the round; the answer says whether the next round may start."""
    return round_gate.report_round(
        session,
        study_id,
        attempt,
        body.record,
        log=request.app.state.audit_log,
        policy=request.app.state.policy_context,
    )


@router.get("/checkpoints/{round_number}")
def get_checkpoint(
    study_id: StudyId, attempt: Attempt, round_number: Round, session: SessionDep
) -> Response:
    """A kept aggregate (:func:`pack_checkpoint`); its total weight and digest in headers."""
    model = round_gate.read_checkpoint(session, study_id, attempt, round_number)
    return Response(
        content=pack_checkpoint(model),
        media_type=CHECKPOINT_MEDIA_TYPE,
        headers={
            "X-Concord-Total-Weight": repr(model.total_weight),
            "X-Concord-Digest": model.digest,
        },
    )


@router.post("/failure")
def post_failure(
    study_id: StudyId, attempt: Attempt, body: RunFailure, request: Request, session: SessionDep
) -> RunVerdict:
    """The ServerApp stopped on an error; the run manager restarts the study."""
    return round_gate.report_failure(
        session, study_id, attempt, body.reason, log=request.app.state.audit_log
    )
