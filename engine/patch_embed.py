"""The vision tower's patch embedding as one matrix product instead of a 3-D convolution.

Qwen2-VL's ``PatchEmbed`` views each row of ``pixel_values`` as one ``(C, T, P, P)`` patch
and runs ``nn.Conv3d`` with kernel = stride = ``(T, P, P)`` over it: every output is the
dot product of the whole patch with one filter, i.e. a linear layer over the flattened
patch. PyTorch's CPU convolution does not see that: on the project's tiny Qwen2-VL the
embedding was 29 % of the vision tower's CPU time as a convolution and 12 % as a product
(3.4 against 1.2 ms per 1024² image, ``python -m bench.image_cost``). vLLM made the same
change for the same reason.

``LinearPatchProjection`` wraps the model's own ``Conv3d`` (same parameter, no copy, so
loading, ``.to()`` and dtype changes keep working) and computes ``patch @ weight.T``;
input of any other shape falls back to the convolution. ``use_linear_patch_projection``
swaps it in where the model has such a convolution and reports whether it did.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class LinearPatchProjection(nn.Module):
    """``conv(x)`` for ``x`` of shape ``[N, C, *kernel]``, as ``[N, E, 1, 1, 1]``, computed
    as one matrix product (sums in another order: equal to float rounding)."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        if not is_patch_convolution(conv):
            raise ValueError(f"{conv} is not a convolution over whole, non-overlapping patches")
        self.conv = conv

    @property
    def weight(self) -> torch.Tensor:
        """The convolution's weight (``PatchEmbed.forward`` reads ``proj.weight.dtype``)."""
        return self.conv.weight

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if patches.dim() != 5 or tuple(patches.shape[2:]) != tuple(conv.kernel_size):
            return conv(patches)
        weight = conv.weight.reshape(conv.out_channels, -1)
        out = functional.linear(patches.reshape(patches.shape[0], -1), weight, conv.bias)
        return out.view(patches.shape[0], conv.out_channels, 1, 1, 1)


def is_patch_convolution(module: nn.Module) -> bool:
    """A plain ``Conv3d`` whose kernel equals its stride (no padding, dilation or groups)."""
    return (
        isinstance(module, nn.Conv3d)
        and tuple(module.kernel_size) == tuple(module.stride)
        and all(p == 0 for p in module.padding)
        and all(d == 1 for d in module.dilation)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


def use_linear_patch_projection(visual: nn.Module) -> bool:
    """Swap ``visual.patch_embed.proj`` for a ``LinearPatchProjection`` if it is a patch
    convolution; ``True`` if it is (now or already) the linear form."""
    patch_embed = getattr(visual, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    if isinstance(proj, LinearPatchProjection):
        return True
    if proj is None or not is_patch_convolution(proj):
        return False
    patch_embed.proj = LinearPatchProjection(proj)
    return True
