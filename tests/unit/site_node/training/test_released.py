"""The researcher's loader: a released file of a catalogue network loads into that network
and answers exactly as the model that was released; the uploading site's layout is the
network's. (A hostile server's files: tests/integration/attacks/test_released_model_attacks.py;
the whole path through the server: tests/unit/consortium_server/release/test_release_gate.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from concord_protocol.contract import ModelSpec
from concord_protocol.errors import ReleasedModelError
from concord_protocol.model_file import ReleasedModelInfo, write_released_file
from concord_protocol.release import canonical_model_bytes, model_sha256
from site_node.training import build_model, flatten, unflatten_into
from site_node.training.released import build_layout, layout_of, load_released_model

CASES = [
    (ModelSpec(name="tabular-mlp", version="1"), (30,), 2),
    (
        ModelSpec(name="image-cnn", version="1", hyperparameters={"base_channels": 4}),
        (1, 16, 16),
        3,
    ),
]


def released(
    spec: ModelSpec, shape: tuple[int, ...], classes: int, *, seed: int = 3
) -> tuple[nn.Module, bytes]:
    """A network with weights unlike its seeded start (as after training), and its file."""
    model = build_model(spec, input_shape=shape, num_classes=classes)
    rng = np.random.default_rng(seed)
    unflatten_into(model, rng.normal(0, 0.3, flatten(model).shape[0]))
    data = canonical_model_bytes(flatten(model))
    info = ReleasedModelInfo(
        study_id="s-1",
        contract_hash="ab" * 32,
        model_sha256=model_sha256(data),
        spec=spec,
        input_shape=shape,
        num_classes=classes,
    )
    layout = layout_of(model, input_shape=shape, num_classes=classes)
    return model.eval(), write_released_file(info, layout, data)


@pytest.mark.parametrize(("spec", "shape", "classes"), CASES, ids=[c[0].name for c in CASES])
def test_a_released_file_loads_into_the_network_and_answers_as_the_released_model(
    spec: ModelSpec, shape: tuple[int, ...], classes: int, tmp_path: Path
) -> None:
    original, blob = released(spec, shape, classes)
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    loaded = load_released_model(path)
    assert not loaded.training
    assert type(loaded) is type(original)
    batch = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), original(batch), rtol=0, atol=0)
    assert load_released_model(blob).state_dict().keys() == original.state_dict().keys()


def test_the_card_may_be_a_path_and_must_be_json(tmp_path: Path) -> None:
    spec, shape, classes = CASES[0]
    _, blob = released(spec, shape, classes)
    card = tmp_path / "card.json"
    card.write_text("not json")
    with pytest.raises(ReleasedModelError) as refused:
        load_released_model(blob, card=card)
    assert refused.value.code == "released_model.card_mismatch"
    card.write_text(json.dumps([1, 2]))
    with pytest.raises(ReleasedModelError) as refused:
        load_released_model(blob, card=card)
    assert refused.value.code == "released_model.card_mismatch"


def test_the_upload_layout_is_the_networks_and_only_for_the_decrypted_size() -> None:
    spec, shape, classes = CASES[1]
    model = build_model(spec, input_shape=shape, num_classes=classes)
    n = flatten(model).shape[0]
    layout = build_layout(spec, input_shape=shape, num_classes=classes, num_params=n)
    assert layout == layout_of(model, input_shape=shape, num_classes=classes)
    assert layout is not None
    assert layout.num_params == n
    assert [p.name for p in layout.parameters] == [name for name, _ in model.named_parameters()]
    assert build_layout(spec, input_shape=shape, num_classes=classes, num_params=n + 1) is None
    assert build_layout(spec, input_shape=(30,), num_classes=classes, num_params=n) is None
    unknown = ModelSpec(name="no-such-model", version="1")
    assert build_layout(unknown, input_shape=shape, num_classes=classes, num_params=n) is None
    # A claimed input of a billion features is sized, not built: refused at once.
    mlp = CASES[0][0]
    assert build_layout(mlp, input_shape=(10**9,), num_classes=2, num_params=n) is None
