"""Shared test fixtures: the project root on sys.path, a fixed seed, and the shared real data."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data')


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same global RNG state (tests also pass explicit generators)."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data():
    """Path of ../shared/data (small real datasets); skips with a reason in a user's own clone."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f'real test data not found at {SHARED_DATA} (only present in the team checkout and CI)')
    return SHARED_DATA
