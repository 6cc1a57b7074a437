"""Sampler filters, one row at a time and in mixed batches."""

import pytest
import torch

from engine.errors import SamplingParamError
from engine.sampler import Sampler, _filtered_probs
from engine.sampling_params import SamplingParams


def test_filters_touch_only_the_rows_that_ask_for_them():
    torch.manual_seed(0)
    logits = torch.randn(2, 5000)
    plain = SamplingParams(temperature=1.0)
    filtered = SamplingParams(temperature=1.0, top_p=0.5, top_k=50, min_p=0.1)
    alone = _filtered_probs(logits[:1], [plain])
    mixed = _filtered_probs(logits, [plain, filtered])
    assert torch.equal(alone[0], mixed[0])
    assert int((mixed[1] > 0).sum()) <= 50


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = _filtered_probs(logits, [SamplingParams(top_p=0.8)])
    assert (probs[0] > 0).tolist() == [True, True, False, False]


def test_min_p_and_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (_filtered_probs(logits, [SamplingParams(min_p=0.5)])[0] > 0).tolist() == [True, True, False, False]
    assert (_filtered_probs(logits, [SamplingParams(top_k=1)])[0] > 0).tolist() == [True, False, False, False]


def test_tiny_temperature_is_greedy():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    out = Sampler(seed=0).sample(logits, [SamplingParams(temperature=1e-45)], [([], [])], [None])
    assert out[0].token_id == 1


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_seed_outside_64_bits_is_a_clear_error(seed):
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(seed=seed)
    assert info.value.subject == "seed"


def _draw(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], steps: int) -> list[list[int]]:
    """``steps`` samples of every row, each row's own generator kept across steps."""
    generators = [sampler.new_generator(p) for p in params]
    rows = [[] for _ in params]
    for _ in range(steps):
        for row, token in enumerate(sampler.sample(logits, params, [([], [])] * len(params), generators)):
            rows[row].append(token.token_id)
    return rows


def test_a_seeded_row_samples_the_same_tokens_alone_or_beside_others():
    """Rows on the shared generator draw their noise together; a seeded row draws from
    its own, so its tokens do not depend on the rest of the batch."""
    torch.manual_seed(1)
    logits = torch.randn(3, 300)
    seeded = SamplingParams(temperature=1.0, seed=42)
    plain = SamplingParams(temperature=1.0)
    [alone] = _draw(Sampler(seed=0), logits[1:2], [seeded], 20)
    _, beside, _ = _draw(Sampler(seed=5), logits, [plain, seeded, plain], 20)
    assert beside == alone
    assert len(set(alone)) > 1  # really sampled, not greedy


def test_rows_on_the_shared_generator_follow_their_own_distributions():
    """Batched noise still samples each row from its own probabilities: a row whose mass
    is all on token 7 always gets 7, a uniform row over four tokens gets all four."""
    logits = torch.full((2, 50), float("-inf"))
    logits[0, 7] = 0.0
    logits[1, :4] = 0.0
    params = [SamplingParams(temperature=1.0)] * 2
    first, second = _draw(Sampler(seed=3), logits, params, 200)
    assert set(first) == {7}
    assert set(second) == {0, 1, 2, 3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_argmax_rows_is_torch_argmax_with_ties_nan_and_strides(dtype):
    """``argmax_rows`` (NumPy's argmax for CPU floats) picks what ``torch.argmax`` picks:
    the first of tied maxima, a NaN over any number, also for a non-contiguous tensor."""
    from engine.sampler import argmax_rows

    values = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)).to(dtype)
    values[1, 7] = values[1, 30] = 100  # a tie: the first wins
    values[2, 40] = float("nan")
    values[3] = 5  # a whole row tied
    values[4, 0] = float("inf")
    for tensor in (values, values.t().contiguous().t(), values[:, ::2]):
        assert argmax_rows(tensor) == torch.argmax(tensor, dim=-1).tolist()
    assert argmax_rows(values)[1:4] == [7, 40, 0]
