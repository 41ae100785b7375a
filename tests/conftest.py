import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

# under pytest-xdist each worker gets one core: one PyTorch thread, and ONNX Runtime sessions with one
# non-spinning intra-op thread, so that workers do not busy-wait on each other's cores
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


def _one_core_sessions():
    from rewrite.backends import ort_session as ort_backend

    make_session = ort_backend.make_session

    def one_core(path, provider=ort_backend.CPU, threads=None, spin=True):
        return make_session(path, provider, threads or torch.get_num_threads(), spin and WORKERS == 1)

    ort_backend.make_session = one_core


if WORKERS > 1:
    _one_core_sessions()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with ``--runslow`` or when ``-m`` selects them."""
    if config.getoption("--runslow") or "slow" in (config.getoption("-m") or ""):
        return
    import pytest

    skip = pytest.mark.skip(reason="slow: run with --runslow or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
