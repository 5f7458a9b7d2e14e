"""first_argmax (the sampler's argmax, rows cut in pieces reduced at once) against torch.argmax: the first
index of each row's maximum, with ties, -inf rows, NaN and vocabularies that do not fill the last piece."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from backend import sampler
from backend.sampler import first_argmax

VALUES = [-float("inf"), -2.0, 0.0, 1.5, 3.0]   # few values: ties everywhere


@settings(max_examples=200, deadline=None)
@given(chunks=st.sampled_from([2, 4, 8, 16]), rows=st.integers(1, 6), extra=st.integers(0, 300),
       seed=st.integers(0, 2**31), nan=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_first_argmax_is_torch_argmax(chunks, rows, extra, seed, nan, dtype):
    vocab = 16 * chunks + extra   # always the pieced path
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(VALUES)[torch.randint(len(VALUES), (rows, vocab), generator=g)].to(dtype)
    x[0] = -float("inf")           # a row with nothing to draw: index 0, as torch
    if nan:
        x[-1, torch.randint(vocab, (3,), generator=g)] = float("nan")   # NaN is the maximum, as torch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampler, "ARGMAX_CHUNKS", chunks)
        assert torch.equal(first_argmax(x), x.argmax(dim=-1))


def test_the_maximum_in_the_last_padded_piece():
    x = torch.zeros(2, 16 * 8 + 5)
    x[0, -1] = 1.0                  # the row's last id, in the piece the padding fills
    x[1, 40] = x[1, 41] = 1.0       # a tie inside one piece: the first
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampler, "ARGMAX_CHUNKS", 8)
        assert first_argmax(x).tolist() == [16 * 8 + 4, 40]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's reductions")
def test_first_argmax_on_the_gpu_at_a_real_vocabulary():
    g = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (128256, 151936, 32000 + 7):
        x = torch.randint(-3, 4, (4, vocab), device="cuda", generator=g).bfloat16()   # ties
        assert torch.equal(first_argmax(x), x.argmax(dim=-1))
