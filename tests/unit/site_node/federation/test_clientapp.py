"""The site's ClientApp: what a message needs at this site (settings, contract, codec)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from consortium_server.federation.plan import RunPlan
from site_node.federation import clientapp
from site_node.training import build_model, num_parameters
from tests.support.flower import approve_everywhere, breast_cancer_contract, make_site


def _context(tmp_path: Path) -> Context:
    contract = breast_cancer_contract(rounds=1)
    sites = [make_site(tmp_path, i) for i in range(3)]
    public = approve_everywhere(sites, "study-1", contract)
    plan = RunPlan(
        study_id="study-1",
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=num_parameters(build_model(contract.model, input_shape=(30,), num_classes=2)),
        sites=tuple(s.site_id for s in sites),
        public_context=public,
    )
    return Context(
        run_id=1,
        node_id=100,
        node_config={
            "site-id": sites[0].site_id,
            "state-dir": str(sites[0].state_dir),
            "datasets-file": str(sites[0].datasets_file),
        },
        state=RecordDict(),
        run_config=plan.to_run_config(),
    )


def test_the_overflow_guard_is_sized_for_every_site_of_the_study(tmp_path: Path) -> None:
    """Each site's values are bounded so that the sum of all the study's sites cannot leave
    CKKS' range: at least the default 32, more for a larger study."""
    from site_node.crypto import CkksCodec

    context = _context(tmp_path)
    small = clientapp.SiteRuntime.from_context(context)
    assert isinstance(small.codec, CkksCodec)
    limit_32 = small.codec.per_site_limit
    many = ",".join(f"site-{i:03d}" for i in range(100))
    context.run_config["sites"] = many
    large = clientapp.SiteRuntime.from_context(context)
    assert isinstance(large.codec, CkksCodec)
    assert large.codec.per_site_limit * 100 == pytest.approx(limit_32 * 32)
