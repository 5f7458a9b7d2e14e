"""The greedy sampler's argmax (kernels.argmax: rows cut in pieces, then the first piece holding the maximum)
against torch.argmax: the first index of each row's maximum, with ties, -inf rows, NaN and vocabularies that do
not fill the last piece, or have fewer ids than pieces."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels.argmax as argmax
from backend import sampler
from kernels.argmax import first_argmax_triton
from tests.kernels.kernel_testing import DEVICE, ON_GPU

VALUES = [-float("inf"), -2.0, 0.0, 1.5, 3.0]   # few values: ties everywhere


@settings(max_examples=60, deadline=None)
@given(pieces=st.sampled_from([2, 4, 16]), rows=st.integers(1, 4), vocab=st.integers(1, 300),
       seed=st.integers(0, 2**31), nan=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_first_argmax_is_torch_argmax(pieces, rows, vocab, seed, nan, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(VALUES)[torch.randint(len(VALUES), (rows, vocab), generator=g)].to(dtype)
    x[0] = -float("inf")           # a row with nothing to draw: index 0, as torch
    if nan:
        x[-1, torch.randint(vocab, (3,), generator=g)] = float("nan")   # NaN is the maximum, as torch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argmax, "PIECES", pieces)
        assert torch.equal(first_argmax_triton(x.to(DEVICE)).cpu(), x.argmax(dim=-1))


def test_the_maximum_in_the_last_padded_piece_and_ties():
    x = torch.zeros(3, 8 * 20 + 5)
    x[0, -1] = 1.0                  # the row's last id, in the piece the vocabulary does not fill
    x[1, 40] = x[1, 41] = 1.0       # a tie inside one piece: the first
    x[2, 19] = x[2, 20] = 1.0       # a tie across two pieces (20 ids each): the first
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argmax, "PIECES", 8)
        assert first_argmax_triton(x.to(DEVICE)).tolist() == [8 * 20 + 4, 40, 19]


def test_the_sampler_takes_the_kernel_for_few_rows(monkeypatch):
    """Up to ARGMAX_TRITON_MAX_ROWS rows on the Triton path the sampler's argmax is the kernel's; more rows (or
    the torch path) torch.argmax."""
    launched = []
    monkeypatch.setattr(sampler.kernels, "first_argmax", lambda x: launched.append(len(x)) or first_argmax_triton(x))
    monkeypatch.setattr(sampler, "ARGMAX_TRITON_MAX_ROWS", 3)
    x = torch.randn(5, 50, device=DEVICE)
    assert torch.equal(sampler.first_argmax(x[:3]), x[:3].argmax(dim=-1)) and launched == [3]
    assert torch.equal(sampler.first_argmax(x), x.argmax(dim=-1)) and launched == [3]


@pytest.mark.skipif(not ON_GPU, reason="the GPU's reductions at real vocabularies")
def test_first_argmax_on_the_gpu_at_a_real_vocabulary():
    g = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (128256, 151936, 32000 + 7):
        x = torch.randint(-3, 4, (4, vocab), device="cuda", generator=g).bfloat16()   # ties
        x[1, vocab // 3] = float("nan")
        assert torch.equal(first_argmax_triton(x), x.argmax(dim=-1))
        assert torch.equal(sampler.first_argmax(x), x.argmax(dim=-1))
