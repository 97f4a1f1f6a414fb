"""The site's ClientApp: what a message needs at this site (settings, contract, codec)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from flwr.app import Context, RecordDict

from concord_protocol.contract import StudyContract
from consortium_server.federation.plan import RunPlan
from site_node.data.cache import shared_cache
from site_node.federation import clientapp
from site_node.settings import SiteSettings
from site_node.training import build_model, num_parameters
from tests.support.flower import approve_everywhere, breast_cancer_contract, make_site
from tests.support.roster import contract_of
from tests.support.volumes import write_decathlon
from tests.support.world import study_contract


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


def _runtime(tmp_path: Path, contract: StudyContract, datasets: list[dict[str, Any]]) -> Any:
    """A runtime that can load the study's datasets (nothing else is used by dataset())."""
    datasets_file = tmp_path / "datasets.yaml"
    datasets_file.write_text(yaml.safe_dump(datasets))
    settings = SiteSettings(
        site_id="hospital-a",
        state_dir=tmp_path / "state",
        datasets_file=datasets_file,
        data_cache_max_bytes=2**20,
    )
    unused: Any = None
    return clientapp.SiteRuntime(
        settings, unused, "study-1", "0" * 64, contract, unused, "", unused, {}, "1"
    )


def _segmentation_contract(steps: list[dict[str, Any]], datasets: list[str]) -> StudyContract:
    return contract_of(
        study_contract(
            datasets,
            task={"kind": "segmentation"},
            model={"name": "unet", "version": "1", "hyperparameters": {"levels": 3}},
            preprocessing={"steps": steps},
        )
    )


RESIZE = [
    {"op": "scale_intensity_range", "a_min": 0, "a_max": 100},
    {"op": "resize", "spatial_size": [12, 12, 12]},
]


def test_the_study_datasets_are_loaded_with_its_preprocessing_through_the_cache(
    tmp_path: Path,
) -> None:
    root = write_decathlon(tmp_path / "Task", n=4)
    entry = {"id": "mr-a", "kind": "decathlon", "path": str(root), "test_fraction": 0.0}
    runtime = _runtime(tmp_path, _segmentation_contract(RESIZE, ["mr-a"]), [entry])
    first = runtime.dataset("train")
    assert first.input_shape == (1, 12, 12, 12)
    assert first.task == "segmentation"
    cache = shared_cache(2**20)
    hits = cache.stats.hits
    second = runtime.dataset("train")  # the next message of the round, or the next round
    assert cache.stats.hits == hits + 4
    assert torch.equal(first.features, second.features)


def test_a_dataset_that_cannot_take_the_preprocessing_refuses_the_message_with_its_code(
    tmp_path: Path,
) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("a,label\n1,x\n2,y\n")
    entry = {"id": "mr-a", "kind": "csv", "path": str(csv), "classes": ["x", "y"]}
    runtime = _runtime(tmp_path, _segmentation_contract(RESIZE, ["mr-a"]), [entry])
    with pytest.raises(clientapp.FederationError) as info:
        runtime.dataset("train")
    assert info.value.code == "data.preprocessing_unsupported"
    assert str(info.value).startswith("data.preprocessing_unsupported: dataset 'mr-a'")


def test_records_of_another_size_than_the_contract_fixes_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_decathlon(tmp_path / "Task", n=2)
    entry = {"id": "mr-a", "kind": "decathlon", "path": str(root), "test_fraction": 0.0}
    runtime = _runtime(tmp_path, _segmentation_contract(RESIZE, ["mr-a"]), [entry])
    real = clientapp.load_dataset

    def ignores_the_spec(config: Any, *, split: Any, **_: Any) -> Any:
        return real(config, split=split)  # a loader that would skip the declared steps

    monkeypatch.setattr(clientapp, "load_dataset", ignores_the_spec)
    with pytest.raises(
        clientapp.FederationError, match=r"\[1, 64, 64, 64\].*\[12, 12, 12\]"
    ) as info:
        runtime.dataset("train")
    assert info.value.code == "data.preprocessing_mismatch"
