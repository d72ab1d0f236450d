"""Class latents: a class written as an image-shaped distribution.

Each class c has a fixed mean pattern m_c of the image's shape C x H x W, and a class latent is

    x_class = m_c + std_scale * eps,        eps ~ N(0, I)      (image->class targets: r std_scale, flow.py).

The noise makes each class a distribution, not a point: the class-level analogue of CrossFlow's
variational text encoder. std_scale = 0 is allowed: class latents are then the bare means, C2I a deterministic
map from K points, and I2C must land each image exactly on its class's mean. Kinds of m_c:

    grayscale   m_c = linspace(-1, 1, K)[c] everywhere.
    rectangle   a rect_size^2 square of a +-1 colour code in a class-specific grid cell, blurred
                (Gaussian, kernel 7, sigma blur_sigma) and rescaled so that max |m_c| = 1.
    smoothrand  seeded N(0, 1) noise at low_res^2, clamped to +-3, min-max rescaled to [-1, 1],
                bilinearly upsampled to H x W.
    clip, text  a pooled text embedding v_c of the class name (unit norm), mapped to C*H*W pixels by
                a fixed seeded orthonormal projection Q (QR of a seeded Gaussian matrix):
                m_c = sqrt(C*H*W) * Q v_c, so pixel RMS is 1 and ||m_a - m_b|| ∝ ||v_a - v_b||.
                Only the 'text' vectors ship (class_vectors/); 'clip' needs `class_vectors.py --kind clip` first.
    learned     CrossFlow's variational encoder for classes: trainable m_c (starting at the rectangle) and log sigma_c^2
                per pixel, x_class = m_c + sigma_c * eps; the KL term 0.5 mean(m^2 + sigma^2 - 1 - log sigma^2) pulls
                every m_c to 0 and sigma_c to 1, bounding their scale, and its pull on the means is ~1000x weaker than
                the flow's (RESULTS.md). The flow's loss pulls the means together (image->class is easiest when every
                class has one mean); a hinge keeps each pair at least as far apart as the closest pair started:
                    L_sep = mean_{a<b} max(0, d_min(init) - d_ab)^2,    d_ab = ||m_a - m_b|| / sqrt(C*H*W).
    noise       m_c = 0, std 1: plain Gaussian noise, the noise->image baseline of standard CFG.

Decoding a latent z back to a class (the I2C prediction): nearest mean by L2,
argmin_c ||z - m_c||, and by cosine similarity, argmax_c <z, m_c> / (||z|| ||m_c||).
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("rectangle", "grayscale", "smoothrand", "clip", "text", "learned", "noise")


def grayscale_means(num_classes, shape):
    return torch.linspace(-1, 1, num_classes).view(-1, 1, 1, 1).expand(num_classes, *shape).clone()


def _gaussian_blur(x, sigma, kernel_size=7):
    coords = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    k1d = torch.exp(-coords**2 / (2 * sigma**2))
    kernel = torch.outer(k1d, k1d) / k1d.sum() ** 2
    # Zero padding: the background of a rectangle latent is 0, so blurring into the border is exact.
    weight = kernel.expand(x.shape[1], 1, kernel_size, kernel_size)
    return F.conv2d(x, weight, padding=kernel_size // 2, groups=x.shape[1])


def rectangle_codes(channels):
    """+-1 colour codes: two grays for C=1; for C=3 four corners of the RGB cube forming a regular
    tetrahedron (every pair equally far apart)."""
    if channels == 1:
        return torch.tensor([[1.0], [-1.0]])
    assert channels == 3, f"rectangle latents support 1 or 3 channels, got {channels}"
    return torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])


def rectangle_means(num_classes, shape, rect_size=10, blur_sigma=2.0):
    channels, height, width = shape
    codes = rectangle_codes(channels)
    num_cells = math.ceil(num_classes / len(codes))
    grid = math.ceil(math.sqrt(num_cells))
    cell_h, cell_w = height // grid, width // grid
    # With many classes (ImageNet-100) a cell is smaller than the rectangle: shrink it to its cell, so
    # classes sharing a colour code never overlap.
    rect_h, rect_w = min(rect_size, cell_h), min(rect_size, cell_w)
    means = torch.zeros(num_classes, channels, height, width)
    for c in range(num_classes):
        # Place first, colour second: classes 0..num_cells-1 take every cell with code 0.
        cell, code = c % num_cells, c // num_cells
        top = (cell // grid) * cell_h + (cell_h - rect_h) // 2
        left = (cell % grid) * cell_w + (cell_w - rect_w) // 2
        means[c, :, top:top + rect_h, left:left + rect_w] = codes[code].view(-1, 1, 1)
    means = _gaussian_blur(means, blur_sigma)
    return means / means.abs().amax(dim=(1, 2, 3), keepdim=True)


def smoothrand_means(num_classes, shape, low_res=6, seed=0):
    channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(num_classes, channels, low_res, low_res, generator=generator).clamp(-3, 3)
    lo, hi = low.amin(dim=(1, 2, 3), keepdim=True), low.amax(dim=(1, 2, 3), keepdim=True)
    low = 2 * (low - lo) / (hi - lo) - 1
    return F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)


def projected_means(vectors, shape, seed=0):
    """Text vectors (K, D) -> mean patterns (K, C, H, W): sqrt(C*H*W) Q v_c, Q (C*H*W, D) with orthonormal columns
    from the QR of a seeded Gaussian matrix (an isometry scaled to pixel RMS 1)."""
    vectors = F.normalize(vectors.float(), dim=1)
    numel = math.prod(shape)
    assert numel >= vectors.shape[1], f"cannot map {vectors.shape[1]}-d vectors isometrically into {numel} pixels"
    gaussian = torch.randn(numel, vectors.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = (q * torch.sign(torch.diagonal(r))).float()  # QR's signs fixed: Q is a deterministic function of the seed
    return (math.sqrt(numel) * vectors @ q.T).view(-1, *shape)


# Class-name vectors are computed once by class_vectors.py (it needs a text encoder) and shipped here.
CLASS_VECTORS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "class_vectors")


def class_vectors_path(kind, dataset, directory=CLASS_VECTORS_DIR):
    return os.path.join(directory, f"{kind}_{dataset}.pt")


def load_class_vectors(kind, dataset, directory=CLASS_VECTORS_DIR):
    """The cached class-name vectors of `dataset` for kind 'clip' or 'text': (vectors (K, D) float32, names)."""
    path = class_vectors_path(kind, dataset, directory)
    make = f"python class_vectors.py --kind {kind} --dataset {dataset}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no cached {kind!r} class-name vectors for {dataset} at {path}; "
                                f"make them with: {make}")
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, and how to remake it
        raise ValueError(f"cannot read the class-vector cache {path} ({e}); remake it with: {make}") from None
    if not isinstance(cache, dict) or not {"vectors", "names"} <= cache.keys():
        raise ValueError(f"{path} is not a class-vector cache; remake it with: {make}")
    return cache["vectors"].float(), list(cache["names"])


class ClassEmbedder(nn.Module):
    """Draws class latents for labels (forward) and decodes latents back to labels (decode)."""

    def __init__(self, means, std_scale=1.0, kind="rectangle"):
        super().__init__()
        self.kind, self.std_scale = kind, std_scale
        if kind == "learned":
            self.means = nn.Parameter(means.float().clone())
            self.logvar = nn.Parameter(torch.full_like(self.means, math.log(max(std_scale, 1e-3) ** 2)))
            distances = self.distances()
            self.min_distance = distances.min().item() if len(distances) else 0.0  # the closest pair at init
        else:
            self.register_buffer("means", means.float())

    @property
    def num_classes(self):
        return self.means.shape[0]

    def stds(self, y):
        """The noise std of the latents of labels y, per pixel: std_scale, or for 'learned' its own learned one."""
        if self.kind == "learned":
            return torch.exp(0.5 * self.logvar[y])
        return torch.full_like(self.means[y], self.std_scale)

    def forward(self, y, generator=None):
        mean = self.means[y]
        if self.kind != "learned" and self.std_scale == 0:
            return mean  # the bare means: each class one latent, and no draw
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + self.stds(y) * eps

    def kl_loss(self):  # KL(N(m, sigma^2) || N(0, I)), mean over pixels and classes
        if self.kind != "learned":
            return self.means.new_zeros(())
        return 0.5 * (self.means**2 + self.logvar.exp() - 1 - self.logvar).mean()

    def distances(self):
        """d_ab = ||m_a - m_b|| / sqrt(C*H*W) for the pairs a < b: the RMS pixel distance of the means."""
        flat = self.means.flatten(1)
        pairs = torch.triu_indices(len(flat), len(flat), offset=1, device=flat.device)
        return (flat[pairs[0]] - flat[pairs[1]]).pow(2).mean(dim=1).sqrt()

    def separation_loss(self):  # L_sep of the module docstring; 0 for fixed means
        if self.kind != "learned":
            return self.means.new_zeros(())
        return F.relu(self.min_distance - self.distances()).pow(2).mean()

    @torch.no_grad()
    def spread(self):
        """The closest and the mean pair distance, and the mean std of the latents: for the training log."""
        distances = self.distances()
        return dict(means_min_distance=distances.min().item(), means_mean_distance=distances.mean().item(),
                    latent_std=self.stds(torch.arange(self.num_classes, device=self.means.device)).mean().item())

    @torch.no_grad()
    def decode(self, z):
        """Nearest class mean by L2 and by cosine similarity: (pred_l2, pred_cos), int64 (N,)."""
        if self.kind == "noise":
            raise ValueError("a 'noise' source carries no class: there is nothing to decode")
        z = z.flatten(1).float()
        means = self.means.detach().flatten(1).float().to(z.device)
        pred_l2 = torch.cdist(z, means).argmin(dim=1)
        pred_cos = (F.normalize(z, dim=1) @ F.normalize(means, dim=1).T).argmax(dim=1)
        return pred_l2, pred_cos


def accuracy(pred, labels, num_classes):
    """(fraction of pred == labels, the same per class: None for a class absent from labels)."""
    pred, labels = (torch.as_tensor(t).long().cpu() for t in (pred, labels))
    hit = pred == labels
    per_class = [hit[labels == c].sum().item() / (labels == c).sum().item() if (labels == c).any() else None
                 for c in range(num_classes)]
    return hit.sum().item() / max(len(hit), 1), per_class


def i2c_accuracy(pred_l2, pred_cos, labels, num_classes=None):
    """I2C accuracy of the nearest-mean predictions (ClassEmbedder.decode), overall and per class."""
    num_classes = num_classes or int(torch.as_tensor(labels).max()) + 1
    (acc_l2, per_class_l2), (acc_cos, per_class_cos) = (accuracy(p, labels, num_classes) for p in (pred_l2, pred_cos))
    return dict(i2c_acc_l2=acc_l2, i2c_acc_cos=acc_cos, per_class_i2c_acc_l2=per_class_l2,
                per_class_i2c_acc_cos=per_class_cos)


def build_embedder(kind, num_classes, shape, std_scale=1.0, seed=0, rect_size=10, blur_sigma=2.0,
                   low_res=6, vectors=None, dataset=None):
    """The --embedding flags -> a ClassEmbedder. 'clip' and 'text' take `vectors` (K, D), else the cached
    class-name vectors of `dataset`."""
    if kind not in KINDS:
        raise ValueError(f"unknown embedding {kind!r}; choose one of {', '.join(KINDS)}")
    if std_scale < 0:
        raise ValueError(f"--std-scale must be >= 0, got {std_scale}")
    if kind == "grayscale":
        means = grayscale_means(num_classes, shape)
    elif kind in ("rectangle", "learned"):  # 'learned' starts as a working latent and learns from there
        means = rectangle_means(num_classes, shape, rect_size, blur_sigma)
    elif kind == "smoothrand":
        means = smoothrand_means(num_classes, shape, low_res, seed)
    elif kind in ("clip", "text"):
        if vectors is None and dataset is not None:
            vectors, _ = load_class_vectors(kind, dataset)
        if vectors is None or len(vectors) != num_classes:
            raise ValueError(f"the {kind!r} embedding needs one class-name vector per class")
        means = projected_means(vectors, shape, seed)
    else:  # noise
        return ClassEmbedder(torch.zeros(num_classes, *shape), 1.0, kind="noise")
    return ClassEmbedder(means, std_scale, kind)
