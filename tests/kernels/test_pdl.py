"""kernels.pdl: which launches use programmatic dependent launch. Its effect (kernels overlapping in a stream,
each waiting for the one before) is checked on the GPU by every kernel and engine test, which run with it on
there (Hopper), the CUDA-graph engine tests included."""
import pytest
import torch

import kernels.pdl as pdl_module
from kernels.pdl import pdl


def test_off_where_not_supported():
    assert pdl(torch.device("cpu")) == {"PDL": False}
    assert pdl(torch.device("cpu"), feeds_gemm=True) == {"PDL": False}
    assert pdl(torch.device("cpu"), feeds_attention=True) == {"PDL": False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_from_hopper_unless_switched_off(monkeypatch):
    device = torch.device("cuda")
    on = torch.cuda.get_device_capability()[0] >= 9
    assert pdl(device) == ({"PDL": True, "launch_pdl": True} if on else {"PDL": False})
    for setting, feeds in (("RELEASE_BEFORE_GEMM", "feeds_gemm"), ("RELEASE_BEFORE_ATTENTION", "feeds_attention")):
        for release, constexpr in [(None, True), ("after_wait", 2), ("at_start", 3)]:
            monkeypatch.setattr(pdl_module, setting, release)
            assert pdl(device, **{feeds: True}) == ({"PDL": constexpr, "launch_pdl": True} if on else {"PDL": False})
            assert pdl(device) == pdl(device, **{feeds: False})   # the others wait only
    monkeypatch.setattr(pdl_module, "USE_PDL", False)
    assert pdl(device) == {"PDL": False}
