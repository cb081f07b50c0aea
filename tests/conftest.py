import pytest
import torch

import fastlaplace


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and fastlaplace.has_cuda()


CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and CUDA kernels")],
)
DEVICES = [pytest.param("cpu"), CUDA]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
