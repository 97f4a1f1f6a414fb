"""Fixtures for the crypto tests: one study context per test module (generation is ~50 ms)."""

from __future__ import annotations

import pytest

from site_node.crypto import RoundInfo, generate_study_context, public_context

CONTRACT_HASH = "ab" * 32


@pytest.fixture(scope="module")
def secret_ctx() -> bytes:
    return generate_study_context()


@pytest.fixture(scope="module")
def public_ctx(secret_ctx: bytes) -> bytes:
    return public_context(secret_ctx)


def round_info(num_params: int, *, round_number: int = 1, study_id: str = "study-1") -> RoundInfo:
    return RoundInfo(study_id, CONTRACT_HASH, round_number, num_params)
