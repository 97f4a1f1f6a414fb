"""The Flower message layout of a Concord round: one place both sides read it from.

The ServerApp (:mod:`consortium_server.federation.serverapp`) builds these messages and the
site's ClientApp (:mod:`site_node.federation.clientapp`) answers them. ``RecordDict`` keys:

* train, server -> site: ``config`` (ConfigRecord: ``round``, ``study-id``,
  ``contract-hash``, ``total-weight``, ``has-global``, ``global-round``) and, from round 2,
  ``global`` (ArrayRecord of the previous aggregate in the update wire format).
* train, site -> server: ``update`` (ArrayRecord, blobs ``[header, *chunks]``), ``metrics``
  (MetricRecord: ``num-examples``, ``epsilon``, ``train-seconds``, ``encrypt-seconds``),
  ``site`` (ConfigRecord: ``site-id``, ``key-fingerprint``).
* evaluate, server -> site: ``config`` and ``global`` as above (the new aggregate).
* evaluate, site -> server: ``metrics`` (``num-examples``, ``loss``, ``accuracy``, ``auc``)
  and ``site``.

The run config a study's run carries (the keys of the bundle's ``[tool.flwr.app.config]``)
is listed in :data:`RUN_CONFIG_KEYS`; a site reads ``contract-hash`` and ``sites`` from it.
Wire-format blobs travel as ``Array`` payloads of ``stype`` :data:`BLOB_STYPE`.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Array, ArrayRecord

__all__ = [
    "BLOB_STYPE",
    "REC_CONFIG",
    "REC_GLOBAL",
    "REC_METRICS",
    "REC_SITE",
    "REC_UPDATE",
    "RUN_CONFIG_KEYS",
    "arrays_to_blobs",
    "blobs_to_arrays",
]

#: ``stype`` of an ``Array`` that carries opaque bytes (a wire-format blob).
BLOB_STYPE = "concord.blob.v1"

# Record and key names of the message layout (see the module docstring).
REC_CONFIG, REC_GLOBAL, REC_UPDATE, REC_METRICS, REC_SITE = (
    "config",
    "global",
    "update",
    "metrics",
    "site",
)

#: Keys of a study run's run config (what the consortium server sets for each run).
RUN_CONFIG_KEYS = (
    "study-id",
    "contract-hash",
    "contract",
    "num-params",
    "sites",
    "public-context",
    "node-wait-s",
    "start-round",
    "attempt",
    "site-peers",
)


def blobs_to_arrays(blobs: Sequence[bytes]) -> ArrayRecord:
    """Wrap wire-format blobs as a Flower ``ArrayRecord`` (keys ``0000``, ``0001``, ...)."""
    record = ArrayRecord()
    for index, blob in enumerate(blobs):
        record[f"{index:04d}"] = Array(
            dtype="uint8", shape=(len(blob),), stype=BLOB_STYPE, data=bytes(blob)
        )
    return record


def arrays_to_blobs(record: ArrayRecord) -> list[bytes]:
    """Inverse of :func:`blobs_to_arrays`; raises ``ValueError`` on any other layout."""
    keys = list(record.keys())
    if keys != [f"{i:04d}" for i in range(len(keys))]:
        raise ValueError("blob record keys are not 0000..n in order")
    blobs: list[bytes] = []
    for key in keys:
        array = record[key]
        if array.stype != BLOB_STYPE or array.dtype != "uint8":
            raise ValueError("blob record holds a non-blob array")
        blobs.append(bytes(array.data))
    return blobs
