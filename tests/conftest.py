import os

import pytest
import torch

# Tests are small; more threads only add contention on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _peak_cache(tmp_path_factory):
    # the trainer caches the machine's matmul peak in the user's cache folder; tests use a temporary one
    os.environ["MONOVLM_PEAK_CACHE"] = str(tmp_path_factory.mktemp("peak") / "peak_flops.json")


@pytest.fixture(scope="module")
def one_thread():
    # tensors this small gain nothing from a second thread, and its synchronisation is slow on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
