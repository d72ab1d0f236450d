"""ADM-style UNet (Dhariwal & Nichol's guided-diffusion) used as the velocity field v_θ.

    v_θ(x, t, cond, direction) : (N, C, H, W) -> (N, C, H, W)

The embeddings of t, of the guidance label cond and of the direction live in model_dit.py (ConditionEmbedder,
shared by both models). Encoder: a stem conv, then per level `num_res_blocks` residual blocks (with self-attention
where the feature map size is in `attention_resolutions`) and a strided-conv downsample; a middle of
ResBlock-Attention-ResBlock; the decoder mirrors it, each block taking the matching encoder activation on channels,
upsampling by nearest + conv. The conditioning vector emb enters each residual block by scale-shift normalisation:

    (scale, shift) = Linear(SiLU(emb)),   h = GroupNorm(h) · (1 + scale) + shift.

The last conv of each residual block, each attention output projection and the output conv start at
zero: every block is the identity and the model outputs 0 at init.

Where to attend: these presets read the reference's "attention at 16 and 8" as feature-map sides (11 attention
blocks, 4 heads); the reference's UNet reads them as downsampling factors and, at 32x32, attends at 4x4 only,
with one head (6 blocks; reference_attention, `train.py --unet-attention reference`; METHOD.md section 6).
"""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_dit import ConditionEmbedder


def group_norm(channels):
    """GroupNorm with ADM's 32 groups, fewer when that would leave under 4 channels per group."""
    groups = math.gcd(32, channels)  # a power of two dividing channels
    while groups > 1 and channels // groups < 4:
        groups //= 2  # stays a divisor; avoids degenerating into per-channel (instance) norm
    return nn.GroupNorm(groups, channels)


def zero_init(module):
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        return self.skip(x) + self.out_layers(self.out_norm(h) * (1 + scale) + shift)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions of a feature map, residual."""

    def __init__(self, channels, num_heads):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f'num_heads {num_heads} does not divide the {channels} channels of an attention layer')
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        n, channels, height, width = x.shape
        tokens, head_dim = height * width, channels // self.num_heads
        # Token-major memory (a no-op under channels_last): the fused SDPA kernels need head_dim at stride 1.
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()
        qkv = qkv.reshape(n, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, H·W, head_dim)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, channels)
        return x + self.proj(out.transpose(1, 2).reshape(n, channels, height, width))


def downsample(channels):  # Sequentials whose convolution keeps ADM's parameter name 'conv'
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(channels, channels, 3, stride=2, padding=1)))


def upsample(channels):
    return nn.Sequential(OrderedDict(up=nn.Upsample(scale_factor=2, mode='nearest'),
                                     conv=nn.Conv2d(channels, channels, 3, padding=1)))


class EmbedSequential(nn.Sequential):
    """Sequential that hands the conditioning vector to the residual blocks only."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, input_size, in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
                 dropout, num_heads, num_cond_labels=2, bidirectional=False):
        super().__init__()
        num_downsamples = len(channel_mult) - 1
        if input_size % 2 ** num_downsamples:
            raise ValueError(f'input_size {input_size} must be divisible by 2^{num_downsamples} for '
                             f'channel_mult {tuple(channel_mult)}; use fewer levels or a larger image')
        emb_channels = 4 * model_channels
        self.condition_embedder = ConditionEmbedder(emb_channels, num_cond_labels, bidirectional,
                                                    frequency_size=model_channels)

        channels, resolution = model_channels, input_size
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, channels, 3, padding=1))])
        skip_channels = [channels]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(channels, mult * model_channels, emb_channels, dropout)]
                channels = mult * model_channels
                if resolution in attention_resolutions:
                    layers.append(AttentionBlock(channels, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(channels)
            if level < num_downsamples:
                self.input_blocks.append(EmbedSequential(downsample(channels)))
                skip_channels.append(channels)
                resolution //= 2

        self.middle_block = EmbedSequential(ResBlock(channels, channels, emb_channels, dropout),
                                            AttentionBlock(channels, num_heads),
                                            ResBlock(channels, channels, emb_channels, dropout))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            # One block more than the encoder level: it also consumes the downsample's activation.
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(channels + skip_channels.pop(), mult * model_channels, emb_channels, dropout)]
                channels = mult * model_channels
                if resolution in attention_resolutions:
                    layers.append(AttentionBlock(channels, num_heads))
                if level > 0 and i == num_res_blocks:
                    layers.append(upsample(channels))
                    resolution *= 2
                self.output_blocks.append(EmbedSequential(*layers))
        assert not skip_channels and resolution == input_size

        self.out = nn.Sequential(
            group_norm(channels), nn.SiLU(), zero_init(nn.Conv2d(channels, in_channels, 3, padding=1)))

    def forward(self, x, t, cond, direction=None):
        emb = self.condition_embedder(t, cond, direction)
        skips = []
        for block in self.input_blocks:
            x = block(x, emb)
            skips.append(x)
        x = self.middle_block(x, emb)
        for block in self.output_blocks:
            x = block(torch.cat([x, skips.pop()], dim=1), emb)
        return self.out(x)


_REFERENCE = dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16, 8),
                  dropout=0.1, num_heads=4)


def reference_attention(input_size):
    """The reference's placement: its (16, 8) as downsampling factors, i.e. sides input/16 and input/8, one head."""
    return dict(attention_resolutions=(input_size // 16, input_size // 8), num_heads=1)


# Constructor kwargs but the data's and the mode's; tiny is for short CPU runs.
UNET_PRESETS = {
    'tiny': dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
                 dropout=0.0, num_heads=4),
    **{name: dict(_REFERENCE) for name in ('mnist', 'cifar', 'imagenet')},
}
