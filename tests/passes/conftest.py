import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small matmuls and SVDs: intra-op threads cost more than they give (and thrash on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
