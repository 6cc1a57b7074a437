"""The vision tower's patch embedding as one matrix product, over one frame of a still image.

Qwen2-VL's ``PatchEmbed`` views each row of ``pixel_values`` as one ``(C, T, P, P)`` patch
(T = ``temporal_patch_size`` = 2: a video's consecutive frames) and runs ``nn.Conv3d`` with
kernel = stride = ``(T, P, P)`` over it: every output is the dot product of the whole
patch with one filter, i.e. a linear layer over the flattened patch. ``LinearPatchEmbed``
replaces that module with two measured savings:

- **a product, not a convolution**: PyTorch's CPU convolution does not see that it is one;
  on the project's tiny Qwen2-VL the embedding was 29 % of the vision tower's CPU time as
  a convolution and 12 % as a product (3.4 against 1.2 ms per 1024² image, ``python -m
  bench.image_cost``). vLLM made the same change for the same reason.
- **one frame per still image**: the image processor repeats a still image's frame T
  times to fill the temporal patch, so half of every row is a copy. The project's own
  preprocessing (``vl/qwen2_vl_pixels.py``) writes the frame once (a 1024² image: 12.5
  instead of 25 MB of pixel slot, written and read once) and this module multiplies it
  with the filter summed over the temporal axis: ``sum_t W_t x = (sum_t W_t) x``, equal
  to float rounding.

Rows of the full width (a processor's own output, videos) are embedded as the convolution
embeds them. The module keeps the model's ``proj`` convolution as its parameter holder (same
tensor, no copy: loading, ``.to()`` and dtype changes keep working). ``use_linear_patch_embed``
swaps it in where the tower's patch embedding is such a convolution; where it is not, the
adapter widens one-frame rows with ``repeat_frame`` before the tower sees them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class LinearPatchEmbed(nn.Module):
    """``PatchEmbed(rows)`` for rows of ``C*T*P*P`` values (whole patches) or ``C*P*P``
    values (one frame of a still image, standing for that frame repeated T times), as
    ``[rows, embed_dim]``. Raises ``ValueError`` for rows of any other width."""

    def __init__(self, patch_embed: nn.Module) -> None:
        super().__init__()
        conv = getattr(patch_embed, "proj", None)
        if conv is None or not is_patch_convolution(conv):
            raise ValueError(f"{patch_embed} has no convolution over whole, non-overlapping patches")
        self.proj = conv
        self.in_channels = conv.in_channels
        self.temporal_patch_size, self.patch_size, _ = conv.kernel_size
        self.embed_dim = conv.out_channels
        self.patch_width = conv.weight[0].numel()  # C*T*P*P
        self.frame_width = self.patch_width // self.temporal_patch_size  # C*P*P

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        conv = self.proj
        width = hidden_states.shape[-1]
        if width == self.patch_width:
            weight = conv.weight.reshape(self.embed_dim, -1)
        elif width == self.frame_width:
            weight = conv.weight.sum(dim=2).reshape(self.embed_dim, -1)  # the filter over one frame
        else:
            raise ValueError(
                f"pixel rows of {width} values: the patch embedding takes {self.patch_width} "
                f"(whole patches) or {self.frame_width} (one frame)"
            )
        rows = hidden_states.reshape(-1, width).to(dtype=weight.dtype)
        return functional.linear(rows, weight, conv.bias)


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


def use_linear_patch_embed(visual: nn.Module) -> bool:
    """Swap ``visual.patch_embed`` for a ``LinearPatchEmbed`` if its ``proj`` is a patch
    convolution; ``True`` if the tower's embedding is (now or already) the linear form,
    which takes one-frame rows."""
    patch_embed = getattr(visual, "patch_embed", None)
    if isinstance(patch_embed, LinearPatchEmbed):
        return True
    proj = getattr(patch_embed, "proj", None)
    if proj is None or not is_patch_convolution(proj):
        return False
    visual.patch_embed = LinearPatchEmbed(patch_embed)
    return True


def repeat_frame(rows: torch.Tensor, in_channels: int, temporal: int) -> torch.Tensor:
    """One-frame rows ``[N, C*P*P]`` as the processor lays out whole patches ``[N, C*T*P*P]``
    (the frame repeated over the temporal axis of each channel): a new tensor."""
    frame = rows.reshape(rows.shape[0], in_channels, 1, -1)
    return frame.expand(-1, -1, temporal, -1).reshape(rows.shape[0], -1)
