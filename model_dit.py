"""Diffusion Transformer (DiT) with adaLN-Zero conditioning, used as the velocity field v_θ.

    v_θ(x, t, cond, direction) : (N, C, H, W) -> (N, C, H, W)

The input is cut into p×p patches, linearly embedded, plus a fixed 2D sin-cos position embedding.
One conditioning vector per sample (ConditionEmbedder, shared with model_unet.py):

    c = MLP(sinusoid(1000·t)) + E_cond[cond] (+ E_dir[direction] when bidirectional),

cond one of num_cond_labels guidance labels (2 for indicator CFG: conditional, null; K + 1 for standard
class CFG). For each of its attention and MLP branches a block computes (shift, scale, gate) =
Linear(SiLU(c)) and does

    h = h + gate · Branch(LayerNorm(h) · (1 + scale) + shift).

"Zero": the modulation linears and the final projection start at zero, so every block is the identity
and the model outputs exactly 0 at init.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal features of a (N,) float tensor: [cos(t·ω_k), sin(t·ω_k)], ω_k = max_period^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, dim % 2))  # an odd dim gets a last channel of zeros


class ConditionEmbedder(nn.Module):
    """c = MLP(sinusoid(1000·t)) + E_cond[cond] (+ E_dir[direction]): one vector per sample. The model that owns
    it initialises its weights: DiT.initialize_weights draws N(0, 0.02²); the UNet keeps PyTorch's defaults."""

    def __init__(self, hidden_size, num_cond_labels, bidirectional=False, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.bidirectional = bidirectional
        self.time_mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.cond_embedding = nn.Embedding(num_cond_labels, hidden_size)
        self.direction_embedding = nn.Embedding(2, hidden_size) if bidirectional else None

    def forward(self, t, cond, direction=None):
        assert t.shape == cond.shape and t.ndim == 1, f'expected t and cond of shape (N,), got {t.shape}, {cond.shape}'
        assert (direction is not None) == self.bidirectional, 'direction iff the model is bidirectional'
        # t in [0, 1] scaled to the [0, 1000] range the sinusoid frequencies were designed for
        c = self.time_mlp(timestep_embedding(1000.0 * t, self.frequency_size)) + self.cond_embedding(cond)
        if self.bidirectional:
            c = c + self.direction_embedding(direction)
        return c


def sincos_position_embedding(dim, grid_size):
    """Fixed 2D position embedding (grid_size², dim): half the channels encode the row, half the column."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing='ij')

    def embed_1d(positions):
        angles = positions.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([embed_1d(rows), embed_1d(cols)], dim=1).float()


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, tokens, head_dim)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, dim))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        # No affine LayerNorm: scale and shift come from the conditioning.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate='tanh'), nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_attn[:, None] * self.attn(modulate(self.norm1(x), shift_attn, scale_attn))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, input_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio=4.0,
                 num_cond_labels=2, bidirectional=False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f'input_size {input_size} is not divisible by patch_size {patch_size}; '
                             'pick a patch size that divides the image size')
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f'hidden_size {hidden_size} must be divisible by num_heads {num_heads} and by 4')
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # Not persistent: a fixed function of the shape, which checkpoints need not carry.
        self.register_buffer('pos_embed', sincos_position_embedding(hidden_size, self.grid_size)[None],
                             persistent=False)
        self.condition_embedder = ConditionEmbedder(hidden_size, num_cond_labels, bidirectional)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch embedding is a linear map of the flattened patch; the embedders get DiT's small normals.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for module in self.condition_embedder.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output starts at exactly 0.
        final = self.final_layer
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [final.adaLN_modulation[-1], final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """(N, T, p·p·C) -> (N, C, H, W)."""
        n, p, g, channels = x.shape[0], self.patch_size, self.grid_size, self.in_channels
        x = x.reshape(n, g, g, p, p, channels)
        return torch.einsum('nhwpqc->nchpwq', x).reshape(n, channels, g * p, g * p)

    def forward(self, x, t, cond, direction=None):
        c = self.condition_embedder(t, cond, direction)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, hidden)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


# Constructor kwargs but the data's and the mode's: the datasets' reference settings, and tiny for short CPU runs.
DIT_PRESETS = {
    'tiny': dict(patch_size=4, hidden_size=192, depth=6, num_heads=3),
    'mnist': dict(patch_size=2, hidden_size=128, depth=8, num_heads=4),
    'cifar': dict(patch_size=2, hidden_size=256, depth=12, num_heads=4),
    'imagenet': dict(patch_size=2, hidden_size=384, depth=12, num_heads=6),
}
