"""Measure speed on this machine: training, sampling, FID features (FID against NFE: evaluate.py).

    python bench.py --quick                 # tiny presets, a few steps: ~30 s on a 2-core CPU
    python bench.py                         # GPU: every preset, DiT and UNet, bf16 and fp32, compile off/on
    python bench.py --loss-curves 200 --batch-size 16    # speed changes keep the fixed-seed loss curve?

The timed step is train.py's (train_step, EMA update) on synthetic uint8 data on the device, at the preset's batch on a
GPU (16 on a CPU): the median over timed windows after warm-up. A configuration that fails (out of memory, no compiler)
is recorded and the rest measured. Peak memory: max_memory_allocated on a GPU (None on a CPU).

    MFU = (FLOPs of forward + backward, FlopCounterMode) / (step time) / (this device's measured GEMM FLOP/s)
"""
import gc
import json
import statistics
import time
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
import devices
import inception
import train
from checkpoint import build_from_checkpoint, build_training_state, load_checkpoint
from data import atomic_write
from devices import non_negative_float, positive_int
from flow import DEFAULT_STEPS, SOLVERS

PRESET_DATASET = {"tiny": "mnist", "mnist": "mnist", "cifar": "cifar", "imagenet": "imagenet100"}


def median_seconds(fn, device, windows, repeats):
    """fn's seconds per call: the median over `windows` timed windows of `repeats` calls each."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times = []
    for _ in range(windows):
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize()
        times.append((time.perf_counter() - start) / repeats)
    return statistics.median(times)


def matmul_tflops(device, dtype, size):
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up: library selection, clocks
    return 2 * size**3 / median_seconds(lambda: a @ b, device, 3, 3) / 1e12


def build_training(preset, model_name, batch_size, device, bf16, compile, channels_last, dataset=None, seed=0):
    """train.main's step on `dataset` (uint8 images, labels) or synthetic data; step() -> the loss, left on device."""
    args = train.get_args(["--dataset", PRESET_DATASET[preset], "--preset", preset, "--model", model_name,
                           "--mode", "bidi", "--batch-size", str(batch_size)])
    torch.manual_seed(seed)
    state, flow, params = build_training_state(vars(args), device, channels_last)
    model, ema, embedder, ema_embedder, optimizer = state.values()
    generator = torch.Generator(device).manual_seed(seed)
    if dataset is None:
        n = 8 * batch_size
        dataset = (torch.randint(0, 256, (n, *args.data_shape), dtype=torch.uint8, generator=generator, device=device),
                   torch.randint(0, args.num_classes, (n,), generator=generator, device=device))
    batches = data.Batches(*dataset, batch_size, seed=seed, device=device)
    autocast = devices.autocast(device, bf16)
    if compile:
        torch._dynamo.reset()  # a fresh compile per configuration, not a recompile of the last one
    train_model = torch.compile(model) if compile else model

    def step():
        x_uint8, y = batches.next()
        loss = train.train_step(train_model, embedder, flow, optimizer, params, x_uint8, y, generator, autocast,
                                args)[0]
        train.update_ema(ema, model, args.ema_decay)
        train.update_ema(ema_embedder, embedder, args.ema_decay)
        return loss.detach()
    return step, dict(args=args, model=model, embedder=embedder, flow=flow)


def count_step_flops(parts, device, batch_size):
    """FLOPs of forward + backward, counted at batch 2 and scaled: every op here is per-sample."""
    x_image = torch.zeros(2, *parts["args"].data_shape, device=device)  # the values do not change the count
    y = torch.zeros(2, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        parts["flow"].loss(parts["model"], x_image, y, parts["embedder"])[0].backward()
    parts["model"].zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2 * batch_size


def bench_training(config, device, peak_tflops, args):
    warmup, windows, window_seconds = (1, 2, 0.0) if args.quick else (3, args.windows, args.window_seconds)
    cuda = device.type == "cuda"
    if cuda:  # the peak above what is left allocated: a fresh window per configuration
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    step, parts = build_training(config["preset"], config["model"], config["batch_size"], device, config["bf16"],
                                 config["compile"], config["channels_last"])
    for _ in range(warmup):
        step()
    repeats = max(1, min(100, round(window_seconds / median_seconds(step, device, 1, 1))))
    seconds = median_seconds(step, device, windows, repeats)
    peak_mem_mb = round((torch.cuda.max_memory_allocated(device) - baseline) / 2**20, 1) if cuda else None
    flops = count_step_flops(parts, device, config["batch_size"])
    return dict(config, img_per_s=config["batch_size"] / seconds, step_ms=1000 * seconds, gflop_per_step=flops / 1e9,
                peak_mem_mb=peak_mem_mb, mfu=flops / seconds / 1e12 / peak_tflops["bf16" if config["bf16"] else "fp32"])


def loss_curves(args, device):
    """Fixed-seed loss curves of the real step on real MNIST: does NHWC or compile keep the eager NCHW step's
    curve? Set against the gap a second seed makes, the noise. report["curves"]: {model: {variant: [means]}}."""
    dataset = tuple(t.to(device) for t in data.load_dataset("mnist", "train", args.data_dir))
    window = max(1, args.loss_curves // 10)
    batch_size = args.batch_size or train.TRAIN_PRESETS["tiny"]["batch_size"]
    report = dict(steps=args.loss_curves, batch_size=batch_size, window=window, curves={})
    for model in ("unet", "dit"):
        curves = report["curves"][model] = {}
        for name, seed, channels_last, compile in (("eager", 0, False, False), ("eager seed 1", 1, False, False),
                                                   ("NHWC", 0, True, False), ("compiled", 0, model == "unet", True)):
            if model == "dit" and name == "NHWC":
                continue  # a DiT has no convolution past its patch embedding: NHWC does not apply
            step, _ = build_training("tiny", model, batch_size, device, devices.bf16_is_fast(device), compile,
                                     channels_last, dataset, seed)
            losses = torch.stack([step() for _ in range(args.loss_curves)]).cpu()
            curves[name] = losses[:len(losses) // window * window].view(-1, window).mean(1).tolist()
            gap = max(abs(a - b) for a, b in zip(curves[name], curves["eager"]))
            print(f"{model} {name:13s} " + " ".join(f"{v:.4f}" for v in curves[name])
                  + f" | max |diff| to eager {gap:.4f}", flush=True)
    if args.json:
        atomic_write(args.json, lambda f: json.dump(report, f, indent=1), mode="w")
    return report


def bench_sampling(checkpoint, preset, device, batch_size, windows):
    """Each solver at its default steps, on a trained EMA model or on the preset's DiT with weights moved
    off their zero init (an adaLN-Zero model outputs exactly 0, which would make dopri5 look free)."""
    if checkpoint:
        model, embedder, flow, _ = build_from_checkpoint(load_checkpoint(checkpoint), device)
    else:
        _, parts = build_training(preset, "dit", 1, device, False, False, False)
        model, embedder, flow = parts["model"].eval().requires_grad_(False), parts["embedder"], parts["flow"]
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # torch's generator, seeded by build_training
    y = torch.arange(batch_size, device=device) % embedder.num_classes
    z = embedder(y, torch.Generator(device).manual_seed(0))
    rows = []
    for solver in SOLVERS:
        sample = partial(flow.c2i, model, embedder, y, z=z, solver=solver, steps=DEFAULT_STEPS.get(solver))
        nfe = sample()[1]  # warm-up, and the NFE
        seconds = median_seconds(sample, device, windows, 1)
        rows.append(dict(solver=solver, steps=DEFAULT_STEPS.get(solver), nfe=nfe, batch_size=batch_size,
                         seconds_per_batch=seconds, img_per_s=batch_size / seconds))
        print(f"sampling {solver:8s} steps {rows[-1]['steps']} NFE {nfe:3d}: {seconds:.3f} s per batch of {batch_size}")
    return rows


def run_benchmarks(args, device):
    """Matmul peaks, sampling, Inception, then the training configurations, each printed as it ends."""
    deadline = time.time() + args.time_budget if args.time_budget else float("inf")
    cuda = device.type == "cuda"
    size = 8192 if cuda else (512 if args.quick else 1024)
    windows = 1 if args.quick else 3
    report = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
                  matmul_tflops=dict(bf16=matmul_tflops(device, torch.bfloat16, size),
                                     fp32=matmul_tflops(device, torch.float32, size)),
                  threads=torch.get_num_threads(), training=[], skipped=[], failed=[])
    print(f"{report['device']} | torch {report['torch']} | {report['threads']} threads | matmul "
          + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in report["matmul_tflops"].items()))
    report["sampling"] = bench_sampling(args.checkpoint, "tiny" if args.quick else "mnist", device,
                                        256 if cuda else 2 if args.quick else 16, windows)
    # Inception's speed does not depend on its weights: a fresh one needs no download.
    fid_inception = devices.place(inception.FIDInceptionV3().eval(), device, nhwc_on_cpu=True)  # as load_inception
    images = torch.randint(0, 256, (200 if cuda else 2 if args.quick else 8, 1, 32, 32), dtype=torch.uint8)
    features = partial(inception.inception_features, fid_inception, images, len(images))
    features()
    seconds = median_seconds(features, device, windows, 1)
    report["inception"] = dict(batch_size=len(images), img_per_s=len(images) / seconds)
    print(f"FID Inception features: {report['inception']['img_per_s']:.1f} img/s")
    # Eager first: a --time-budget cuts the compiled configurations.
    configs = [dict(preset=preset, model=model, bf16=bf16, compile=compile, channels_last=channels_last,
                    batch_size=args.batch_size or {**train.REFERENCE, **train.TRAIN_PRESETS[preset]}["batch_size"])
               for compile in args.compile for bf16 in args.precision for preset in args.presets
               for model, channels_last in (("dit", False), ("unet", True), ("unet", False))]
    for config in configs:
        if time.time() > deadline - (60 if config["compile"] else 3):
            report["skipped"].append(config)
        else:
            try:
                report["training"].append(bench_training(config, device, report["matmul_tflops"], args))
                print(format_row(report["training"][-1]), flush=True)
            except Exception as error:
                report["failed"].append(dict(config, error=f"{type(error).__name__}: {error}"[:500]))
                print(f"failed: {config}: {type(error).__name__}: {error}"[:300], flush=True)
        if args.json:  # after every configuration: a crash keeps the rows before it
            atomic_write(args.json, lambda f: json.dump(report, f, indent=1), mode="w")
    return report


def format_row(r):
    name = f"{r['preset']} {r['model']}{'-cl' if r['channels_last'] else ''}"
    return (f"{name:14s} {'bf16' if r['bf16'] else 'fp32'} {'compile' if r['compile'] else 'eager  '} "
            f"batch {r['batch_size']:4d} | {r['img_per_s']:9.1f} img/s | {r['step_ms']:8.1f} ms | "
            f"peak {r['peak_mem_mb'] or 'n/a':>8} MB | {r['gflop_per_step']:9.1f} GFLOP | MFU {100 * r['mfu']:5.1f}%")


def main():
    p = devices.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny presets at batch 4 in train.py's precision, no compile")
    p.add_argument("--device", default="auto", help="auto (CUDA where there is one), cpu, cuda, cuda:N")
    p.add_argument("--presets", nargs="+", choices=tuple(PRESET_DATASET), help="default: all on a GPU, tiny on a CPU")
    p.add_argument("--batch-size", type=positive_int, help="default: the preset's on a GPU, 16 on a CPU")
    p.add_argument("--compile", choices=("off", "on", "both"), help="default: both on a GPU, else off")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32", "both"), help="default: both (auto with --quick)")
    p.add_argument("--checkpoint", help="time sampling with this trained model (default: random weights)")
    p.add_argument("--windows", type=positive_int, default=5, help="timed windows per configuration (median)")
    p.add_argument("--window-seconds", type=non_negative_float, default=0.5)
    p.add_argument("--time-budget", type=non_negative_float, default=0, help="seconds, then skip the rest")
    p.add_argument("--json", default="bench.json")
    p.add_argument("--data-dir", default="data", help="loss curves: where MNIST is")
    p.add_argument("--loss-curves", type=positive_int, metavar="STEPS", help="tiny presets' seeded loss curves")
    args = p.parse_args()
    device = devices.pick(args.device)
    full = device.type == "cuda" and not args.quick
    args.presets = args.presets or (("mnist", "cifar", "imagenet", "tiny") if full else ("tiny",))
    args.batch_size = args.batch_size or (4 if args.quick else None if device.type == "cuda" else 16)
    args.compile = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile or ("both" if full else "off")]
    args.precision = dict(auto=(devices.bf16_is_fast(device),), bf16=(True,), fp32=(False,),
                          both=(True, False))[args.precision or ("auto" if args.quick else "both")]
    report = loss_curves(args, device) if args.loss_curves else run_benchmarks(args, device)
    if report.get("skipped"):
        print(f"{len(report['skipped'])} configurations skipped by --time-budget")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    devices.run_main(main)
