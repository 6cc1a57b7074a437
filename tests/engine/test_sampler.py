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
