"""A convolutional stem in place of the ViT's linear patch embedding (Xiao et al., 2021, "Early
convolutions help transformers see better").

The small embedded-study backbones (``vit_cmnist``) learn far faster with it: a linear 4 x 4 patch
embedding of a 12-block, 32-wide ViT sits on the chance plateau for hundreds of steps on 196
tokens of mostly blank or cluttered canvas, a stack of 3 x 3 convolutions does not
(docs/design-notes.md#backbone). The stem still ends on the same grid (one token per
``patch_size`` x ``patch_size`` patch), so every method sees the tokens it would see on DeiT.

It is a timm ``PatchEmbed`` whose ``proj`` is the convolution stack, passed to an unmodified timm
``VisionTransformer`` as ``embed_layer``; the engine and the FLOP counter see it as any other
module. Its BatchNorm layers matter (measured: with GroupNorm or no normalisation the same ViT
stays on the plateau two to three times longer); their running statistics are frozen with the
backbone while a method trains (``TokenReductionModule``), so the unpruned backbone stays the one
that was pretrained.
"""

from __future__ import annotations

import math

from timm.layers import PatchEmbed
from torch import nn


class ConvStemPatchEmbed(PatchEmbed):
    """``log2(patch_size)`` stages of two 3x3 convolutions (the second of stride 2), each followed by
    BatchNorm and ReLU, channels doubling from ``stem_width``; then a 1x1 convolution to
    ``embed_dim``."""

    def __init__(self, *args, stem_width: int = 16, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        patch = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or patch < 2 or 2 ** round(math.log2(patch)) != patch:
            raise ValueError(f"a conv stem needs a square power-of-two patch_size, not {self.patch_size}")
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        layers: list[nn.Module] = []
        width, channels = stem_width, in_chans
        for _ in range(round(math.log2(patch))):
            for c_in, c_out, stride in ((channels, width, 1), (width, 2 * width, 2)):
                layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            channels, width = 2 * width, 2 * width
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.in_chans = in_chans


EMBED_LAYERS: dict[str, type[PatchEmbed]] = {"patch": PatchEmbed, "conv_stem": ConvStemPatchEmbed}
