"""Shared test fixtures: the project root on sys.path, a fixed seed, one torch thread, and the shared real data."""
import contextlib
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


@contextlib.contextmanager
def _torch_threads(n):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Tiny models and tensors: on a busy 2-core machine a second thread's synchronisation makes each op many times
# slower. Modules opt in with pytestmark = pytest.mark.usefixtures('one_thread'); the thread count is restored after.
@pytest.fixture
def one_thread():
    """One torch thread for each test of the module (its module-scoped fixtures keep the default)."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope='module')
def one_thread_per_module():
    """One torch thread for the whole module, its module-scoped fixtures (trained models, features) included."""
    with _torch_threads(1):
        yield


@pytest.fixture
def shared_data():
    """Path of ../shared/data (small real datasets); skips with a reason in a user's own clone."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f'real test data not found at {SHARED_DATA} (only present in the team checkout and CI)')
    return SHARED_DATA
