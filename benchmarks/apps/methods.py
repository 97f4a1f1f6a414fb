"""The comparison's methods and the run-config keys that only the comparison bundle has.

Both ends read them: the comparison ServerApp (:mod:`benchmarks.apps.compare_server`)
picks its round loop by :data:`AGGREGATION_KEY`, the comparison ClientApp
(:mod:`benchmarks.apps.compare_client`) its train handler. Concord's own bundle declares
neither key, and Flower refuses run-config keys a bundle does not declare, so no Concord
run can name them.
"""

from __future__ import annotations

__all__ = ["AGGREGATION_KEY", "CKKS", "FEDAVG", "METHODS", "RECORDS_DIR_KEY", "SECAGGPLUS"]

#: The run-config key naming the method.
AGGREGATION_KEY = "aggregation"
#: The run-config key naming the directory the comparison ServerApp writes its records to
#: (:mod:`benchmarks.apps.records`; empty: none written).
RECORDS_DIR_KEY = "records-dir"
CKKS, FEDAVG, SECAGGPLUS = "ckks", "fedavg", "secagg+"
METHODS = (FEDAVG, CKKS, SECAGGPLUS)
