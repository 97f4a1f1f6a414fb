"""How the server sizes a study's network: the dataset's published input, with the spatial
size the contract's declared preprocessing fixes (channels and classes stay the dataset's)."""

from __future__ import annotations

from typing import Any

import pytest

from concord_protocol.catalogue import parameter_count
from concord_protocol.contract import StudyContract
from concord_protocol.preprocessing import PreprocessingSpec
from consortium_server.datasets.service import model_input
from consortium_server.errors import InvalidRequestError
from consortium_server.federation.coordinator import model_size
from tests.support.roster import contract_of
from tests.support.world import study_contract

UNET = {"name": "unet", "version": "1", "hyperparameters": {"levels": 3}}
RESIZE_32 = {"steps": [{"op": "resize", "spatial_size": [32, 32, 32]}]}


def _contract(preprocessing: dict[str, Any] | None = None) -> StudyContract:
    extra = {"preprocessing": preprocessing} if preprocessing is not None else {}
    return contract_of(
        study_contract(["mr-a", "mr-b", "mr-c"], task={"kind": "segmentation"}, model=UNET, **extra)
    )


def test_without_preprocessing_the_published_shape_is_the_input() -> None:
    summary = {"input_shape": [2, 24, 24, 24], "num_classes": 3}
    assert model_input(summary) == ((2, 24, 24, 24), 3)
    assert model_input(summary, PreprocessingSpec()) == ((2, 24, 24, 24), 3)
    intensity = PreprocessingSpec.model_validate(
        {"steps": [{"op": "scale_intensity_range", "a_min": 0, "a_max": 1}]}
    )
    assert model_input(summary, intensity) == ((2, 24, 24, 24), 3)  # size not fixed
    assert model_input({"features": 30}, intensity) == ((30,), 2)


def test_a_fixed_output_size_overrides_the_published_spatial_shape_keeping_channels() -> None:
    spec = PreprocessingSpec.model_validate(RESIZE_32)
    assert model_input({"input_shape": [2, 30, 30, 30], "num_classes": 3}, spec) == (
        (2, 32, 32, 32),
        3,
    )


def test_the_run_is_sized_for_the_size_every_site_makes_its_records() -> None:
    published = {"input_shape": [1, 30, 30, 30], "num_classes": 2}  # not a UNet size
    with pytest.raises(InvalidRequestError) as info:
        model_size(_contract(), published)
    assert info.value.code == "study.invalid"
    contract = _contract(RESIZE_32)
    expected = parameter_count(contract.model, input_shape=(1, 32, 32, 32), num_classes=2)
    assert model_size(contract, published) == expected
    two_channels = {"input_shape": [2, 30, 30, 30], "num_classes": 2}
    assert model_size(contract, two_channels) != expected
