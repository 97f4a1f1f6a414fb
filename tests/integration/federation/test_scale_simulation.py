"""``benchmarks/scale.py --quick`` on Flower's simulation engine (Ray): 10 virtual sites.

Runs the script as a user would and checks what must hold whatever the machine's speed:
the round aggregated the updates of all 10 simulated sites (no reply rejected or missing),
every site evaluated the new aggregate, the final aggregate that the ServerApp wrote
decrypts to finite parameters at two different sites (identically: same study key), and the
benchmark's JSON carries its figures. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.apps.records import read_outcome
from benchmarks.scale import SiteDirs
from concord_protocol.contributions import AggregateManifest
from concord_protocol.processes import FLOWER_ENV
from concord_protocol.wire.format import CKKS_TAG_SLOTS, EncodedUpdate
from consortium_server.federation.checkpoints import GlobalModel
from site_node.crypto.codecs import CkksCodec, ListedSum
from site_node.data.registry import DatasetConfig, load_dataset
from site_node.federation.approvals import ApprovalStore

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "scale.py"
SITES = [f"site-{i:03d}" for i in range(10)]
STUDY_ID = "scale-benchmark"

RUN_FIELDS = {
    "sites",
    "rounds_asked",
    "status",
    "params",
    "actors",
    "setup_seconds",
    "simulation_seconds",
    "rounds",
    "driver_baseline_rss_bytes",
    "driver_peak_rss_bytes",
    "driver_ru_maxrss_bytes",
    "ray",
    "final_model",
    "load_before",
    "load_after",
    "records_per_site",
}
ROUND_FIELDS = {
    "round",
    "status",
    "participants",
    "rejected",
    "missing",
    "wall_seconds",
    "train_wall_seconds",
    "evaluate_wall_seconds",
    "aggregate_seconds",
    "server_step_seconds",
    "screening_seconds",
    "first_train_reply_seconds",
    "last_train_reply_seconds",
    "bytes_sent",
    "bytes_received",
    "train_replies_held_bytes",
    "driver_peak_rss_bytes",
    "evaluation",
    "epsilon_max",
}


def _decrypt(state_dir: Path, model: GlobalModel, num_params: int) -> object:
    """Open the final aggregate as that site does: its own key, the tags checked against
    the sites the manifest lists."""
    key = ApprovalStore(state_dir).study_key(STUDY_ID)
    assert key is not None, f"no study key in {state_dir}"
    update = EncodedUpdate.from_bytes_list(list(model.blobs))
    listed = ListedSum(
        update.header.round_info(), AggregateManifest.from_json(model.manifest).sites
    )
    return CkksCodec(key.secret_context, tag_slots=CKKS_TAG_SLOTS).decrypt_aggregate(
        update.chunks, num_params=num_params, total_weight=model.total_weight, listed=listed
    )


def test_quick_scale_run_aggregates_ten_simulated_sites(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    workdir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--workdir", str(workdir)],
        env={**os.environ, **FLOWER_ENV},
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    # The benchmark's figures.
    body = json.loads(out.read_text())
    assert body["benchmark"] == "scale"
    (run,) = body["runs"]
    assert set(run) >= RUN_FIELDS, RUN_FIELDS - set(run)
    assert run["sites"] == 10
    assert run["status"] == "completed", run.get("failure")
    assert run["records_per_site"] == 200
    (round_1,) = run["rounds"]
    assert set(round_1) >= ROUND_FIELDS, ROUND_FIELDS - set(round_1)
    assert round_1["status"] == "aggregated"
    assert round_1["participants"] == 10
    assert round_1["rejected"] == round_1["missing"] == round_1["error_replies"] == 0
    assert round_1["messages_sent"] == 20  # train and evaluate, one each per site
    assert 0 < round_1["aggregate_seconds"] <= round_1["server_step_seconds"]
    # ten CKKS updates of two ciphertexts each (~130 kB per ciphertext), all held at once
    assert round_1["train_replies_held_bytes"] > 10 * 2 * 100_000
    assert round_1["bytes_received"] > round_1["train_replies_held_bytes"]
    assert round_1["evaluation"]["sites"] == 10
    assert 0.0 <= round_1["evaluation"]["accuracy"] <= 1.0
    assert 0 < round_1["epsilon_max"] <= 8.0
    assert run["driver_peak_rss_bytes"] >= run["driver_baseline_rss_bytes"] > 0
    assert run["ray"]["actor_processes"] >= 1
    assert run["ray"]["actor_peak_rss_bytes_max"] > 0
    assert run["final_model"]["decrypts"] is True
    assert run["final_model"]["finite"] is True

    # What the ServerApp wrote, read back and decrypted at two sites with their own keys.
    run_dir = workdir / "10-sites"
    outcome = read_outcome(run_dir / "records")
    assert outcome is not None
    assert outcome.status == "completed"
    (record,) = outcome.rounds
    assert record.participants == SITES
    assert sorted(record.sample_counts) == SITES
    # Each site's weight is its train split: 200 records, each in the test split when its
    # keyed hash says so (20 % on average), read back from the site's own configuration.
    dirs = SiteDirs(str(run_dir / "sites"))
    expected = {}
    for index, site in enumerate(SITES):
        (config,) = yaml.safe_load(dirs.datasets_file(index).read_text())
        expected[site] = len(load_dataset(DatasetConfig.model_validate(config), split="train"))
    assert record.sample_counts == expected
    assert all(120 <= n <= 190 for n in expected.values())
    assert record.total_weight == float(sum(expected.values()))
    final = outcome.final_model
    assert final is not None
    assert final.digest == run["final_model"]["digest"]
    assert len(AggregateManifest.from_json(final.manifest).sites) == 10
    first = _decrypt(run_dir / "sites" / "site-000" / "state", final, run["params"])
    last = _decrypt(run_dir / "sites" / "site-009" / "state", final, run["params"])
    assert isinstance(first, np.ndarray)
    assert first.shape == (run["params"],)
    assert np.isfinite(first).all()
    assert np.abs(first).max() > 0
    np.testing.assert_array_equal(first, last)
