"""The comparison ClientApp: Flower SecAgg+ at the site, Concord's handlers otherwise.

``app`` is what the comparison bundle's ``clientapp`` names
(:data:`benchmarks.apps.compare_server.CLIENTAPP_REF`). A site runs it only for a bundle
whose hash its operator allowed with this ClientApp
(``ApprovalStore.allow_fab(hash, clientapp="benchmarks.apps.compare_client:app")``);
Concord's own bundle always runs Concord's ClientApp (see ``site_node.federation.processes``).
Like Concord's, every message passes the site's :class:`ContractGuardMod` first.

``train``: when the run config's ``aggregation`` key says ``secagg+``
(:mod:`benchmarks.apps.methods`), the message goes through Flower 1.41's own
``secaggplus_mod`` (setup, share keys, collect masked vectors, unmask); otherwise it is
Concord's train handler, untouched (``ckks`` and ``fedavg`` are Concord's own paths).
``evaluate`` is Concord's, except under SecAgg+: there the comparison ServerApp computed the
global model itself (it unmasks the sum) and sends it in Concord's plaintext wire format
without a manifest of signed contributions, because none could vouch for a sum the server
made; :func:`_evaluate_secaggplus` scores it as it comes. That is one more reason SecAgg+ is
only a benchmark here.

At the "collect masked vectors" stage the mod calls :func:`fit`: local DP-SGD exactly as in
the encrypted path (the contract's model from the fixed seed, or the global model the server
sent; Opacus with the study's accountant on disk), replying the plaintext parameters and the
sample count as a legacy ``FitRes``, which the mod then quantises and masks. The reply also
carries Concord's plain metadata (``metrics``: sample count, epsilon, timings, values
outside SecAgg+'s clipping range; ``site``: the site id) so the server can record the round
as it does for its own path.

SecAgg+ hides each site's update but the server unmasks the *sum*: the new global model.
So the site refuses it (``compare.encryption_required``) for any contract that asks for
encrypted aggregation, whatever the server sends.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from benchmarks.apps.methods import AGGREGATION_KEY, SECAGGPLUS
from concord_protocol.wire.format import EncodedUpdate
from concord_protocol.wire.messages import (
    REC_CONFIG,
    REC_GLOBAL,
    REC_METRICS,
    REC_SITE,
    arrays_to_blobs,
)
from site_node.federation import clientapp as concord_clientapp
from site_node.federation.approvals import ApprovalStore
from site_node.federation.clientapp import FederationError, SiteRuntime, site_settings
from site_node.federation.mods import ContractGuardMod
from site_node.training.params import flatten, num_parameters, unflatten_into

__all__ = ["app", "evaluate", "fit", "secaggplus_train", "train"]

#: ``fitins.config`` keys the comparison ServerApp sends with the training instructions.
FIT_ROUND, FIT_STUDY, FIT_HASH = "round", "study-id", "contract-hash"


def _clipping_range(context: Context) -> float:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    state = context.state.config_records.get(RECORD_KEY_STATE)
    value = state.get("clipping_range", 0.0) if state is not None else 0.0
    return float(value) if isinstance(value, int | float) else 0.0


def _start_vector(arrays: list[npt.NDArray[Any]], n_params: int) -> npt.NDArray[np.float64] | None:
    if not arrays:
        return None
    vector = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])
    if vector.shape[0] != n_params or not np.isfinite(vector).all():
        raise FederationError("the global model does not fit", code="update.global_mismatch")
    return vector


def fit(runtime: SiteRuntime, msg: Message, context: Context) -> Message:
    """SecAgg+'s "collect masked vectors" step: train locally with DP, reply a ``FitRes``.

    The reply's parameters are the trained model as one float64 vector; ``secaggplus_mod``
    replaces them with the masked, quantised vector before the reply leaves the site.
    """
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = fitins.config
    if (
        str(config.get(FIT_STUDY, "")) != runtime.study_id
        or str(config.get(FIT_HASH, "")) != runtime.contract_hash
    ):
        raise FederationError("round content names another study", code="contract.content_mismatch")
    t0 = time.perf_counter()
    arrays = parameters_to_ndarrays(fitins.parameters)
    model, result, _dp = runtime.train_locally(lambda n: _start_vector(arrays, n))
    vector = flatten(model)
    clip = _clipping_range(context)
    clipped = int(np.count_nonzero(np.abs(vector) > clip)) if clip > 0 else 0
    metrics = MetricRecord(
        {
            "num-examples": int(result.num_samples),
            "epsilon": float(result.epsilon_spent if result.epsilon_spent is not None else -1.0),
            "train-seconds": time.perf_counter() - t0,
            "encrypt-seconds": 0.0,
            "clipped-values": clipped,
        }
    )
    fitres = FitRes(
        status=Status(code=Code.OK, message="OK"),
        parameters=ndarrays_to_parameters([vector]),
        num_examples=int(result.num_samples),
        metrics={FIT_ROUND: int(str(config.get(FIT_ROUND, 0)))},
    )
    content: RecordDict = compat.fitres_to_recorddict(fitres, keep_input=True)
    content["metrics"] = metrics
    content["site"] = runtime.site_record()
    return Message(content, reply_to=msg)


def secaggplus_train(msg: Message, context: Context) -> Message:
    """A SecAgg+ ``train`` message (any of its four stages), through ``secaggplus_mod``.

    Raises :class:`FederationError` (``compare.encryption_required``) when the run's
    contract asks for encrypted aggregation. The collect stage's ``encrypt-seconds`` metric
    is the mod's own time (quantising and masking), training excluded.
    """
    from flwr.client.mod import secaggplus_mod

    runtime = SiteRuntime.from_context(context)
    if runtime.contract.encryption.enabled:
        raise FederationError(
            "the contract requires encrypted aggregation; SecAgg+ reveals the sum to the server",
            code="compare.encryption_required",
        )
    fitted: list[tuple[float, MetricRecord]] = []

    def handler(inner: Message, ctxt: Context) -> Message:
        t0 = time.perf_counter()
        reply = fit(runtime, inner, ctxt)
        fitted.append((time.perf_counter() - t0, reply.content.metric_records["metrics"]))
        return reply

    t0 = time.perf_counter()
    reply = secaggplus_mod(msg, context, handler)
    total = time.perf_counter() - t0
    if fitted and not reply.has_error():
        fit_s, metrics = fitted[0]
        metrics["encrypt-seconds"] = max(0.0, total - fit_s)
    return reply


def _store(context: Context) -> ApprovalStore:
    return ApprovalStore(site_settings(context).state_dir)


app = ClientApp(mods=[ContractGuardMod(_store)])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """SecAgg+ when the run config asks for it, else Concord's train handler untouched."""
    if context.run_config.get(AGGREGATION_KEY) == SECAGGPLUS:
        return secaggplus_train(msg, context)
    return concord_clientapp.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Concord's evaluate handler; under SecAgg+ the unverifiable server-made model."""
    if context.run_config.get(AGGREGATION_KEY) == SECAGGPLUS:
        return _evaluate_secaggplus(msg, context)
    return concord_clientapp.evaluate_global(msg, context)


def _evaluate_secaggplus(msg: Message, context: Context) -> Message:
    """Score the plaintext global model a SecAgg+ server sends (benchmark runs only: the
    contract has encryption off, which :func:`secaggplus_train` insists on)."""
    runtime = SiteRuntime.from_context(context)
    if runtime.contract.encryption.enabled:
        raise FederationError(
            "the contract requires encryption; SecAgg+ would not do",
            code="compare.encryption_required",
        )
    data = runtime.dataset("test")
    model = runtime.model_for(data)
    config = msg.content.config_records[REC_CONFIG]
    update = EncodedUpdate.from_bytes_list(arrays_to_blobs(msg.content.array_records[REC_GLOBAL]))
    params = runtime.codec.decrypt_aggregate(
        update.chunks,
        num_params=num_parameters(model),
        total_weight=float(config["total-weight"]),  # type: ignore[arg-type]
    )
    unflatten_into(model, params)
    # The same release as Concord's evaluate (a noisy histogram, charged with the round),
    # so that both methods' metrics are read the same way and cost the same.
    metrics = MetricRecord(runtime.release_evaluation(model, data))
    return Message(
        RecordDict({REC_METRICS: metrics, REC_SITE: runtime.site_record()}), reply_to=msg
    )
