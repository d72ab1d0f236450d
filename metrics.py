"""The metrics of both directions: FID, precision/recall, C2I class-consistency, I2C accuracy (evaluate.py runs them).

Features phi(x) in R^2048: the FID InceptionV3 (inception.py) of 8-bit images, real and generated alike.
With mu, Sigma the mean and (N - 1)-normalised covariance of each set's features,
    FID = |mu_r - mu_g|^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2)).
Statistics files: np.savez of mu (2048,) and sigma (2048, 2048) float64, no features, comparable with
pytorch-fid's and clean-fid's legacy_pytorch ones (METHOD.md, "Comparability").

Precision / recall (Kynkaanniemi et al. 2019): each feature gets a ball of radius the distance to its
k-th nearest neighbour in its own set (itself excluded); then
    precision = fraction of fakes inside at least one real ball   (fakes look real),
    recall    = fraction of reals inside at least one fake ball   (the reals are covered).
I2C accuracy: the I2C end point of class-balanced test images decoded to the nearest class mean (L2, cosine);
the 'readout' scores decode one network call at t = 0 (flow.READOUT). C2I class-consistency: classifier.py's
CNN labels the samples. Judges and reference features are cached under data.cache_dir().
"""
import functools
import os
import time
import zipfile

import numpy as np
import scipy.linalg
import torch

import data
import inception
from classifier import c2i_class_accuracy, confusion_matrix, load_classifier
from data import atomic_write, balanced_subset, cache_dir
from embeddings import i2c_accuracy
from flow import DEFAULT_STEPS, DEFAULT_TIME_GRID, READOUT, network_passes

def feature_stats(features):
    """features (N, D) -> (mu (D,), sigma (D, D)) float64 numpy, covariance normalised by N - 1."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f'need (N >= 2, D) features, got shape {features.shape}')
    return features.mean(axis=0), np.cov(features, rowvar=False)


def load_stats(path, dim=2048):
    """(mu (D,), sigma (D, D)) float64 from an .npz file of mu and sigma: ours, pytorch-fid's or clean-fid's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'statistics file {path} does not exist')
    if not zipfile.is_zipfile(path):
        raise ValueError(f'statistics file {path} is not an .npz file (np.savez of mu and sigma)')
    with np.load(path, allow_pickle=False) as stats:
        if not {'mu', 'sigma'} <= set(stats.files):
            raise ValueError(f'statistics file {path} holds {sorted(stats.files)[:5]}, not mu and sigma')
        mu, sigma = np.asarray(stats['mu'], np.float64), np.asarray(stats['sigma'], np.float64)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f'statistics file {path}: mu {mu.shape} and sigma {sigma.shape} are not the ({dim},) and '
                         f'({dim}, {dim}) of pool3 features')
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) as a Python float."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    all_but_cross_term = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
    # Fewer samples than dimensions: in an orthonormal basis B of range(sigma1 + sigma2), sigma_i = B sigma_i' B^T and
    # Tr (sigma1 sigma2)^(1/2) = Tr (sigma1' sigma2')^(1/2) exactly: sqrtm runs on r x r, not D x D (seconds per FID).
    eigenvalues, vectors = np.linalg.eigh(sigma1 + sigma2)
    keep = eigenvalues > eigenvalues.max() * len(eigenvalues) * np.finfo(np.float64).eps
    if keep.any() and not keep.all():  # else full rank (the usual 10k-sample case), or both zero
        basis = vectors[:, keep]
        sigma1, sigma2 = basis.T @ sigma1 @ basis, basis.T @ sigma2 @ basis
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps  # a singular product can break sqrtm: regularise (pytorch-fid's guard)
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # similar to the PSD sigma1^(1/2) sigma2 sigma1^(1/2), so real up to round-off: a large imaginary part is a bug
        largest = np.abs(np.diagonal(covmean).imag).max()
        if largest > 1e-3 * max(1.0, abs(np.trace(covmean.real))):
            raise ValueError(f'sqrtm(sigma1 sigma2) has an imaginary component of {largest:.3g}')
        covmean = covmean.real
    return float(all_but_cross_term - 2 * np.trace(covmean))


def precision_recall(real_features, fake_features, k=3, block_size=1024):
    """(precision, recall) with k-NN balls; memory is O(block_size * N), so 50k x 50k fits in ~1 GB."""
    real, fake = (torch.as_tensor(np.asarray(f)) for f in (real_features, fake_features))
    real, fake = (f if f.dtype == torch.float64 else f.float() for f in (real, fake))
    if min(len(real), len(fake)) <= k:
        raise ValueError(f'precision/recall with k={k} needs more than k points in each set')

    def covered(queries, centres):  # the fraction of queries inside at least one ball of the centres
        radii = []
        for start in range(0, len(centres), block_size):
            d = torch.cdist(centres[start:start + block_size], centres)
            d.diagonal(start).fill_(float('inf'))  # a point is not its own neighbour
            radii.append(d.kthvalue(k, dim=1).values)
        radii = torch.cat(radii)
        inside = sum(int((torch.cdist(q, centres) <= radii).any(dim=1).sum()) for q in queries.split(block_size))
        return inside / len(queries)
    return covered(fake, real), covered(real, fake)


def quantise(images):
    """What a saved PNG holds: 8-bit levels, back in [-1, 1]. Both judges see generated images so."""
    return data.to_unit_range(data.to_levels(images))


def reference_features(dataset, data_dir, image_size, count, fid_inception, split='test', batch_size=100):
    """Inception features, stats, labels and indices of balanced_subset(`split`, count) (None: all of it), cached."""
    weights = inception.weights_tag(fid_inception)
    path = cache_dir() / f'reference_{dataset}_{image_size}_{split}_{count or "all"}_{weights}.pt'
    if path.is_file():
        return torch.load(path, map_location='cpu', weights_only=True)
    images, labels = data.load_dataset(dataset, split, data_dir, image_size)
    indices = balanced_subset(labels, count)
    features = inception.inception_features(fid_inception, images[indices], batch_size)
    mu, sigma = (torch.from_numpy(stat) for stat in feature_stats(features))
    reference = dict(features=features, labels=labels[indices], indices=indices, mu=mu, sigma=sigma)
    atomic_write(path, lambda f: torch.save(reference, f))
    return reference


# the judges, loaded once per process (train.py evaluates many times)
load_inception_once = functools.lru_cache(maxsize=2)(inception.load_inception)
load_classifier_once = functools.lru_cache(maxsize=4)(load_classifier)


def sampler_settings(solvers, steps=None, time_grids=None):
    """(solver, steps, time_grid) of every combination in order, each once; None: the solver's default; dopri5 once."""
    settings = [('dopri5', None, None) if solver == 'dopri5' else
                (solver, n or DEFAULT_STEPS[solver], grid or DEFAULT_TIME_GRID[solver])
                for solver in solvers for grid in time_grids or [None] for n in steps or [None]]
    return list(dict.fromkeys(settings))


@torch.no_grad()
def evaluate_checkpoint_model(model, embedder, flow, args, num_samples, cfg_scale, steps, solver, device,
                              k=3, seed=0, data_dir=None, batch_size=500, inception_weights=None, time_grid=None,
                              ref_split='test', num_real=None, ref_stats=None):
    """All metrics of one model at one sampler setting (None: the solver's default), as a JSON-ready dict:
    num_samples samples of classes i mod K from class latents drawn with `seed`, judged as the module docstring
    says (P/R overall and per class), and the confusion matrices. `args`: the training args."""
    dataset, image_size, num_classes = args['dataset'], args['image_size'], args['num_classes']
    data_dir = str(data_dir or args['data_dir'])
    fid_inception = load_inception_once(str(device), inception_weights)
    classifier = load_classifier_once(dataset, data_dir, str(device), image_size)
    if ref_stats:
        reference = dict(zip(('mu', 'sigma'), load_stats(ref_stats)), features=None)
    else:
        reference = reference_features(dataset, data_dir, image_size, num_real or num_samples, fid_inception,
                                       ref_split, batch_size)
    solver, steps, time_grid = sampler_settings([solver], [steps], [time_grid])[0]
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

    fake = inception.inception_features(fid_inception, images, batch_size)
    fid = frechet_distance(reference['mu'], reference['sigma'], *feature_stats(fake))
    real = reference['features']
    precision, recall, per_class = None, None, [(None, None)] * num_classes
    if real is not None:
        precision, recall = precision_recall(real, fake, k)
        per_class = [(real[reference['labels'] == c], fake[y == c]) for c in range(num_classes)]
        per_class = [precision_recall(r, f, k) if min(len(r), len(f)) > k else (None, None) for r, f in per_class]
    result = dict(num_samples=num_samples, ref_split=None if ref_stats else ref_split,
                  num_reference=None if real is None else len(real), ref_stats=ref_stats, cfg_scale=cfg_scale,
                  steps=steps, solver=solver, time_grid=time_grid, k=k, fid=fid, precision=precision, recall=recall,
                  per_class_precision=[p for p, _ in per_class], per_class_recall=[r for _, r in per_class],
                  **c2i_class_accuracy(classifier, images, y), classifier_test_acc=classifier.test_accuracy,
                  nfe_c2i=nfe_c2i, network_passes_c2i=network_passes(nfe_c2i, cfg_scale), seconds_c2i=seconds_c2i)

    if embedder.kind != 'noise' and not flow.use_conditioning:  # a noise source has no image -> class way
        start = time.time()
        test_images, test_labels = data.load_dataset(dataset, 'test', data_dir, image_size)
        indices = balanced_subset(test_labels, num_samples)
        x_real, labels = data.to_unit_range(test_images[indices]), test_labels[indices]
        for prefix, decoder in (('i2c', kw), ('readout', dict(kw, **READOUT))):  # the ODE, then one call at t = 0
            predictions = []  # (2, chunk): nearest mean by L2 and by cosine
            for chunk in x_real.split(batch_size):
                x_class, nfe_i2c = flow.i2c(model, embedder, chunk.to(device), **decoder)
                predictions.append(torch.stack(embedder.decode(x_class)).cpu())
            predictions = torch.cat(predictions, dim=1)
            scores = dict(i2c_accuracy(*predictions, labels, num_classes),
                          i2c_confusion_l2=confusion_matrix(labels, predictions[0], num_classes), nfe_i2c=nfe_i2c)
            result.update({key.replace('i2c', prefix, 1): value for key, value in scores.items()})
        result['seconds_i2c'] = time.time() - start
    result['seconds'] = time.time() - overall_start
    return result
