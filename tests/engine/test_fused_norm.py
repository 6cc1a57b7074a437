"""RMSNorm layers computed by one fused operation (engine/fused_norm.py)."""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRMSNorm

from engine.fused_norm import FusedRMSNorm, computes_rms_norm, use_fused_rms_norm


def _norm(width: int = 64) -> Qwen2VLRMSNorm:
    norm = Qwen2VLRMSNorm(width, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(2))
    return norm


class OnePlusWeightRMSNorm(torch.nn.Module):
    """Gemma's form, ``(1 + weight) * normed(x)``: an RMSNorm that ``rms_norm`` is not."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1 + self.weight) * normed


def test_the_fused_norm_equals_the_module_bit_for_bit_and_falls_back_off_float32():
    norm = _norm()
    fused = FusedRMSNorm(norm)
    for shape in [(40, 1, 64), (1, 300, 64)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            assert torch.equal(fused(x), norm(x))
    bf16 = _norm().to(torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(FusedRMSNorm(bf16)(x), bf16(x))  # the module's own rounding


def test_only_norms_that_compute_rms_norm_are_swapped_and_only_once():
    model = torch.nn.Sequential(_norm(), torch.nn.Linear(64, 64), OnePlusWeightRMSNorm(64), torch.nn.LayerNorm(64))
    assert computes_rms_norm(model[0])
    assert not computes_rms_norm(model[2]) and not computes_rms_norm(model[3])
    assert use_fused_rms_norm(model) == 1
    assert isinstance(model[0], FusedRMSNorm) and isinstance(model[2], OnePlusWeightRMSNorm)
    wrapped = model[0]
    assert use_fused_rms_norm(model) == 1  # idempotent
    assert model[0] is wrapped and isinstance(wrapped.norm, Qwen2VLRMSNorm)


def test_the_served_tiny_model_gives_the_unpatched_model_s_logits(tiny_model, tiny_model_dir):
    """The adapter swaps every language-model norm in (sharing the weights), and the served
    model's logits equal those of the model as transformers loads it, bit for bit."""
    served = tiny_model.model
    assert tiny_model.adapter.fused_norms == sum(isinstance(m, FusedRMSNorm) for m in served.modules()) > 0
    assert isinstance(served.model.language_model.norm, FusedRMSNorm)
    reference = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert not any(isinstance(m, FusedRMSNorm) for m in reference.modules())
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 1000, 12]])
    with torch.inference_mode():
        # the served model's language layers use the engine's attention function, which
        # hands a plain mask to SDPA exactly as the reference does
        expected = reference(input_ids=ids).logits
        got = served(input_ids=ids).logits
    assert torch.equal(got, expected)
