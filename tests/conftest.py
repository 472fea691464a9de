"""Shared fixtures: the real data beside the repository, a small batch, the compiled engine."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.multihost import Job
from wrcor_jax.spaces import nb201
from wrcor_jax.spaces.nb201_engine import NB201Engine

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
SAMPLE = SHARED_DATA / "cifar10_sample.npz"
GROUND_TRUTH = SHARED_DATA / "nb201_test_accuracy.csv"
BEST_CIFAR10 = nb201.BEST_CIFAR10
SMALL_BATCH = 16


def require(path: Path) -> Path:
    """Skip the calling test when a file of ../shared/data is absent."""
    if not path.exists():
        pytest.skip(f"{path} not found (../shared/data absent)")
    return path


@pytest.fixture(scope="session")
def small_batch() -> tuple[jax.Array, jax.Array]:
    """A real CIFAR-10 proxy batch of 16 when the sample exists, else seeded noise."""
    if SAMPLE.exists():
        from wrcor_jax.data import load_batch

        images, labels = load_batch("cifar10", SMALL_BATCH, 42, data=SAMPLE)
    else:
        rng = np.random.default_rng(0)
        images = rng.normal(size=(SMALL_BATCH, 32, 32, 3)).astype(np.float32)
        labels = (np.arange(SMALL_BATCH) % 10).astype(np.int32)
    return jnp.asarray(images), jnp.asarray(labels)


@pytest.fixture(scope="session")
def params() -> dict:
    """The seeded supernet weights (10 classes), on device."""
    return jax.device_put(nb201.init_params(42, 10))


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch at 1 thread for a module: its OpenMP pool at 2 threads ran ~18x slower while
    other jobs shared the 2 CPUs."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def engine() -> NB201Engine:
    """One composed engine for the whole session, so its pieces compile once."""
    return NB201Engine()


@pytest.fixture
def job(tmp_path):
    """Processes of a `jax.distributed` job, killed at the end if still running."""
    job = Job(tmp_path)
    try:
        yield job
    finally:
        job.kill_all()
