"""Measure speed on this machine (training, sampling, FID features), and FID against sampler NFE.

    python bench.py --quick                 # tiny presets, a few steps: a one-minute check on a CPU
    python bench.py                         # every preset, DiT and UNet, bf16 and fp32, compile off and on
    python bench.py --nfe-sweep runs/mnist/last.pt --num-samples 5000    # FID, I2C accuracy vs NFE
    python bench.py --loss-curves 200 --batch-size 16    # speed changes keep the fixed-seed loss curve?

Training speed is the real step of train.py (train.train_step: flow.loss in bidi mode, AdamW,
gradient clipping; then the EMA update) on a synthetic uint8 dataset already on the device, at the
preset's batch size (halved until it fits). Warm-up steps (and compilation) are excluded; the
reported time per step is the median over timed windows.

    MFU = (model FLOPs per step) / (step time) / (matmul FLOP/s of that precision on this device)

FLOPs of one forward + backward are counted by torch.utils.flop_counter.FlopCounterMode (attention
through its math path, so it is counted on every device); the matmul FLOP/s is measured here on one
large square GEMM, so MFU reads "fraction of what this device's matrix units deliver".
Peak memory: torch.cuda.max_memory_allocated on a GPU; on a CPU the growth of the process's peak
resident set (VmHWM, reset per configuration) over its size when the configuration started.

The NFE sweep samples the same class latents with every solver / step count / time grid and scores
them with the FID Inception (vs the test set), the I2C accuracy and the C2I class-consistency.

The loss curves train the tiny DiT and UNet on MNIST from one seed with each speed change (NHWC,
torch.compile) and without, and from a second seed: a change keeps the curve if it stays nearer the
plain eager curve than the second seed does.
"""
import argparse
import copy
import ctypes
import gc
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
import evaluate
import train
from checkpoint import build_from_checkpoint, build_model, load_checkpoint
from embeddings import build_embedder
from flow import DEFAULT_STEPS, SOLVERS, TIME_GRIDS

PRESET_DATASET = {"tiny": "mnist", "mnist": "mnist", "cifar": "cifar", "imagenet": "imagenet100"}
# Timed for sampling: each solver at its default steps (flow.DEFAULT_STEPS; euler 40 is the reference).
SAMPLERS = tuple((solver, DEFAULT_STEPS.get(solver)) for solver in SOLVERS)
REFERENCE = ("euler", 40, "uniform")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, windows, repeats):
    times = []
    for _ in range(windows):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / repeats)
    return statistics.median(times)


def matmul_tflops(device, dtype, size, windows=3):
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    (a @ b), (a @ b)  # warm-up: library selection, clocks
    return 2 * size**3 / median_seconds(lambda: a @ b, device, windows, 3) / 1e12


# ---------------------------------------------------------------- peak memory

def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_mark(device):
    """Start a peak-memory window; returns the baseline in MB (None where it cannot be measured)."""
    gc.collect()
    if device.type == "cpu" and sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS growth means new memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        return _proc_status_kb("VmRSS") / 1024
    except (OSError, StopIteration):
        return None


def memory_peak(device, baseline):
    if baseline is None:
        return None
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else _proc_status_kb("VmHWM") / 1024)
    return round(peak - baseline, 1)


# ---------------------------------------------------------------- training

def build_training(preset, model_name, batch_size, device, bf16, compile, channels_last, dataset=None, seed=0):
    """Everything train.main builds for one step, on `dataset` (uint8 images, labels) or a synthetic
    one of the preset's shape. step() returns the loss, left on the device."""
    args = train.get_args(["--dataset", PRESET_DATASET[preset], "--preset", preset, "--model", model_name,
                           "--mode", "bidi", "--batch-size", str(batch_size)])
    torch.manual_seed(seed)
    model = build_model(vars(args)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    embedder = build_embedder(args.embedding, args.num_classes, args.data_shape, args.std_scale,
                              args.embedding_seed, args.rect_size, args.blur_sigma, args.low_res,
                              dataset=args.dataset).to(device)
    ema, ema_embedder = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(embedder)
    flow = train.build_flow(vars(args))
    params = list(model.parameters()) + list(embedder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(seed)
    if dataset is None:
        dataset = (torch.randint(0, 256, (8 * batch_size, *args.data_shape), dtype=torch.uint8, generator=generator,
                                 device=device),
                   torch.randint(0, args.num_classes, (8 * batch_size,), generator=generator, device=device))
    batches = data.Batches(*dataset, batch_size, seed=seed, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    if compile:
        torch._dynamo.reset()  # a fresh compile per configuration, not a recompile of the last one
    train_model = torch.compile(model) if compile else model

    def step():
        x_uint8, y = batches.next()
        loss = train.train_step(train_model, embedder, flow, optimizer, params, x_uint8, y, generator, autocast,
                                args)[0]
        train.update_ema(ema, model, args.ema_decay), train.update_ema(ema_embedder, embedder, args.ema_decay)
        return loss.detach()
    return step, dict(args=args, model=model, train_model=train_model, embedder=embedder, flow=flow,
                      generator=generator, autocast=autocast, batches=batches)


def count_step_flops(parts, device, batch_size):
    """FLOPs of forward + backward, counted at batch 2 and scaled: every op here is per-sample."""
    model, embedder, flow, args = parts["model"], parts["embedder"], parts["flow"], parts["args"]
    x_uint8 = torch.zeros(2, *args.data_shape, dtype=torch.uint8, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _, _ = flow.loss(model, data.to_unit_range(x_uint8), y, embedder)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2 * batch_size


def host_syncs_per_step(step, batches, device):
    """How many times one training step makes the CPU wait for the GPU (CUDA only; 0 is the goal).
    Not the first step of an epoch, which copies the epoch's shuffled order to the GPU once."""
    if device.type != "cuda":
        return None
    if batches.offset == 0:
        step()
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def compiled_loss_agreement(parts):
    """|loss(compiled) - loss(eager)| / loss on one batch with the same weights and random draws.
    Skipped (None) where dropout is active, since the two then draw different masks."""
    model = parts["model"]
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return None
    x_uint8, y = parts["batches"].next()
    state = parts["generator"].get_state()
    losses = []
    for net in (parts["train_model"], model):
        parts["generator"].set_state(state)
        with parts["autocast"]:
            losses.append(parts["flow"].loss(net, data.to_unit_range(x_uint8), y, parts["embedder"],
                                             parts["generator"])[0].item())
    return abs(losses[0] - losses[1]) / max(abs(losses[1]), 1e-12)


def bench_training(config, device, peak_tflops, warmup, windows, window_seconds):
    batch_size = config["batch_size"]
    while True:
        baseline = memory_mark(device)
        try:
            step, parts = build_training(config["preset"], config["model"], batch_size, device, config["bf16"],
                                         config["compile"], config["channels_last"])
            start = time.perf_counter()
            for _ in range(warmup):
                step()
            synchronize(device)
            warmup_seconds = time.perf_counter() - start
            repeats = max(1, min(100, round(window_seconds / median_seconds(step, device, 1, 1))))
            seconds = median_seconds(step, device, windows, repeats)
            peak_mb = memory_peak(device, baseline)
            break
        except torch.OutOfMemoryError:
            parts = step = None
            if batch_size == 1:
                raise
            batch_size //= 2
    flops = count_step_flops(parts, device, batch_size)
    result = dict(config, batch_size=batch_size, img_per_s=batch_size / seconds, step_ms=1000 * seconds,
                  peak_mem_mb=peak_mb, gflop_per_step=flops / 1e9,
                  mfu=flops / seconds / (peak_tflops["bf16" if config["bf16"] else "fp32"] * 1e12),
                  warmup_s=warmup_seconds, host_syncs_per_step=host_syncs_per_step(step, parts["batches"], device),
                  compile_rel_loss_diff=compiled_loss_agreement(parts) if config["compile"] else None)
    return result


def training_configs(presets, precisions, compile_modes, batch_size=None):
    """Most telling first, so that a time budget cuts the least useful: eager in the first precision,
    one compiled DiT, eager in the other precision, then the other compiled configurations."""
    configs = []
    for compile in compile_modes:
        for preset in presets:
            for bf16 in precisions:
                for model, channels_last in (("dit", False), ("unet", True), ("unet", False)):
                    batch = batch_size or train.TRAIN_PRESETS[preset].get("batch_size", train.REFERENCE["batch_size"])
                    configs.append(dict(preset=preset, model=model, bf16=bf16, compile=compile,
                                        channels_last=channels_last, batch_size=batch))
    first = [c for c in configs if not c["compile"] and c["bf16"] == precisions[0]]
    compiled = [c for c in configs if c["compile"]]
    return first + compiled[:1] + [c for c in configs if not c["compile"] and c not in first] + compiled[1:]


def loss_curves(args, device):
    """Fixed-seed loss curves of the real step on real MNIST: does a speed change (NHWC, compile) keep
    the loss curve of the plain eager NCHW step? Its distance to that curve is set against the distance
    a second seed makes, which is the size of the noise. Returns {model: {variant: [window means]}}."""
    dataset = tuple(t.to(device) for t in data.load_dataset("mnist", "train", args.data_dir))
    window, batch_size = max(1, args.loss_curves // 10), args.batch_size or train.TRAIN_PRESETS["tiny"]["batch_size"]
    report = dict(steps=args.loss_curves, batch_size=batch_size, window=window, curves={})
    for model in ("unet", "dit"):
        curves = report["curves"][model] = {}
        for name, seed, channels_last, compile in (("eager", 0, False, False), ("eager seed 1", 1, False, False),
                                                   ("NHWC", 0, True, False), ("compiled", 0, model == "unet", True)):
            if model == "dit" and name == "NHWC":
                continue  # a DiT has no convolution past its patch embedding: NHWC does not apply
            step, _ = build_training("tiny", model, batch_size, device, train.bf16_is_fast(device), compile,
                                     channels_last, dataset, seed)
            losses = torch.stack([step() for _ in range(args.loss_curves)]).cpu()
            curves[name] = losses[:len(losses) // window * window].view(-1, window).mean(1).tolist()
            gap = max(abs(a - b) for a, b in zip(curves[name], curves["eager"]))
            print(f"{model} {name:13s} " + " ".join(f"{v:.4f}" for v in curves[name])
                  + f" | max |diff| to eager {gap:.4f}", flush=True)
    write_json(report, args.json)
    return report


# ---------------------------------------------------------------- sampling and features

def sampling_model(checkpoint, preset, device):
    """A trained EMA model, or the preset's DiT with weights moved off their zero init (an adaLN-Zero
    model outputs exactly 0, which would make dopri5 look free)."""
    if checkpoint:
        model, embedder, flow, args = build_from_checkpoint(load_checkpoint(checkpoint), device)
        return model, embedder, flow, f"{args['model']} {args['preset']} (trained)"
    _, parts = build_training(preset, "dit", 1, device, False, False, False)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in parts["model"].parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator).to(device))
    return parts["model"].eval(), parts["embedder"], parts["flow"], f"dit {preset} (random weights)"


def bench_sampling(model, embedder, flow, device, batch_size, windows):
    y = torch.arange(batch_size, device=device) % embedder.num_classes
    z = embedder(y, torch.Generator(device).manual_seed(0))
    rows = []
    for solver, steps in SAMPLERS:
        kw = dict(solver=solver, steps=steps) if steps else dict(solver=solver)
        nfe = flow.c2i(model, embedder, y, z=z, **kw)[1]  # warm-up, and the NFE
        seconds = median_seconds(lambda: flow.c2i(model, embedder, y, z=z, **kw), device, windows, 1)
        rows.append(dict(solver=solver, steps=steps, nfe=nfe, batch_size=batch_size, seconds_per_batch=seconds,
                         img_per_s=batch_size / seconds))
    return rows


def bench_inception(device, batch_size, windows):
    # Speed does not depend on the weights: a freshly initialised FID Inception needs no download.
    model = evaluate.for_inference(evaluate.FIDInceptionV3(), device)
    images = torch.randint(0, 256, (batch_size, 1, 32, 32), dtype=torch.uint8)
    evaluate.inception_features(model, images, batch_size)
    seconds = median_seconds(lambda: evaluate.inception_features(model, images, batch_size), device, windows, 1)
    return dict(batch_size=batch_size, img_per_s=batch_size / seconds)


def run_benchmarks(args, device):
    """Matmul peaks, sampling, Inception, then the training configurations (each printed as it ends)."""
    deadline = time.time() + args.time_budget if args.time_budget else math.inf
    cuda = device.type == "cuda"
    size = 8192 if cuda else (512 if args.quick else 1024)
    report = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
                  threads=torch.get_num_threads(), quick=args.quick,
                  matmul_tflops={name: matmul_tflops(device, dtype, size)
                                 for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))},
                  training=[], skipped=[])
    model, embedder, flow, name = sampling_model(args.checkpoint, "tiny" if args.quick else "mnist", device)
    report["sampling_model"] = name
    report["sampling"] = bench_sampling(model, embedder, flow, device, 256 if cuda else 2 if args.quick else 16,
                                        1 if args.quick else 3)
    report["inception"] = bench_inception(device, 200 if cuda else 2 if args.quick else 8, 1 if args.quick else 3)
    precision = args.precision or ("auto" if args.quick else "both")
    precisions = dict(auto=(train.bf16_is_fast(device),), bf16=(True,), fp32=(False,), both=(True, False))[precision]
    warmup, windows, window_seconds = (1, 2, 0.0) if args.quick else (3, args.windows, args.window_seconds)
    for config in training_configs(args.presets, precisions, args.compile, args.batch_size):
        if time.time() > deadline - (60 if config["compile"] else 3):
            report["skipped"].append(config)
            continue
        try:
            report["training"].append(bench_training(config, device, report["matmul_tflops"], warmup, windows,
                                                     window_seconds))
            print(format_row(report["training"][-1]), flush=True)
        except Exception as error:  # e.g. no compiler for torch.compile: record it, measure the rest
            report.setdefault("failed", []).append(dict(config, error=f"{type(error).__name__}: {error}"[:500]))
            print(f"failed: {config}: {type(error).__name__}: {error}"[:300], flush=True)
        write_json(report, args.json)
    return report


def format_row(r):
    name = f"{r['preset']} {r['model']}{'-cl' if r['channels_last'] else ''}"
    peak = f"{r['peak_mem_mb']:8.1f}" if r["peak_mem_mb"] is not None else "     n/a"
    return (f"{name:14s} {'bf16' if r['bf16'] else 'fp32'} {'compile' if r['compile'] else 'eager  '} "
            f"batch {r['batch_size']:4d} | {r['img_per_s']:9.1f} img/s | {r['step_ms']:8.1f} ms | "
            f"peak {peak} MB | {r['gflop_per_step']:9.1f} GFLOP | MFU {100 * r['mfu']:5.1f}%")


def write_json(obj, path):
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


# ---------------------------------------------------------------- FID against NFE

def sweep_settings():
    """(solver, steps, time grid), most informative first so that a time budget cuts the least useful:
    the FID-vs-NFE curve of each fixed-step solver on the uniform grid, dopri5, then the other grids."""
    def grid_sweep(pairs, grids=TIME_GRIDS[1:]):
        return [(solver, steps, grid) for grid in grids for solver, steps in pairs]
    by_nfe = {16: (("midpoint", 8), ("rk4", 4), ("euler", 16)), 8: (("midpoint", 4), ("rk4", 2), ("euler", 8)),
              4: (("midpoint", 2), ("rk4", 1), ("euler", 4)), 12: (("midpoint", 6), ("rk4", 3), ("euler", 12))}
    uniform = [(solver, steps, "uniform") for nfe in (16, 8, 4, 12) for solver, steps in by_nfe[nfe]]
    return ([REFERENCE] + uniform + [("dopri5", None, "uniform")] + grid_sweep(by_nfe[16]) + grid_sweep(by_nfe[8])
            + [("euler", 100, "uniform")] + grid_sweep(by_nfe[4]) + grid_sweep(by_nfe[12]))


def sweep_setting(text):
    """'midpoint:8:ends' -> ('midpoint', 8, 'ends'); 'dopri5' -> ('dopri5', None, 'uniform')."""
    solver, steps, grid = (text.split(":") + ["", ""])[:3]
    if solver not in SOLVERS or (solver == "dopri5") != (steps == "") or grid not in ("", *TIME_GRIDS):
        raise argparse.ArgumentTypeError(f"{text!r}: want SOLVER:STEPS[:GRID] with a solver in {', '.join(SOLVERS)}"
                                         f" (dopri5 alone) and a grid in {', '.join(TIME_GRIDS)}")
    if steps and not (steps.isdigit() and int(steps) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: STEPS must be a positive integer")
    return solver, int(steps) if steps else None, grid or "uniform"


def nfe_sweep(args, device):
    """C2I FID (vs the test split), C2I class-consistency and I2C accuracy for every sampler setting,
    always from the same class latents and test images, so the settings differ only by their error."""
    deadline = time.time() + args.time_budget if args.time_budget else math.inf
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the sweep's many forward passes; see the report
    ckpt = load_checkpoint(args.nfe_sweep)
    model, embedder, flow, train_args = build_from_checkpoint(ckpt, device)
    inception = evaluate.load_inception(device, args.inception)
    chunk = 1000 if device.type == "cuda" else 100
    # The class-balanced, cached reference set of evaluate.py, so sweep and evaluate.py FIDs compare.
    real = evaluate.reference_features(train_args["dataset"], args.data_dir, train_args["image_size"],
                                       args.num_real, inception, batch_size=chunk // 2)
    real_stats = real["mu"].numpy(), real["sigma"].numpy()
    test_images, test_labels = data.load_dataset(train_args["dataset"], "test", args.data_dir,
                                                 train_args["image_size"])
    classifier = evaluate.load_classifier(train_args["dataset"], args.data_dir, device)
    y = torch.arange(args.num_samples, device=device) % train_args["num_classes"]
    z = embedder(y, torch.Generator(device).manual_seed(0))
    x_test = data.to_unit_range(test_images[:args.num_i2c]).to(device)
    y_test = test_labels[:args.num_i2c].to(device)
    report = dict(checkpoint=args.nfe_sweep, step=ckpt["step"], num_samples=args.num_samples,
                  num_real=len(real["features"]), num_i2c=args.num_i2c, device=str(device), tf32=device.type == "cuda",
                  inception=args.inception or "default", classifier_test_acc=classifier.test_accuracy,
                  results=[], skipped=[])
    for solver, steps, grid in args.settings or sweep_settings():
        if time.time() > deadline:
            report["skipped"].append([solver, steps, grid])
            continue
        kw = dict(solver=solver, time_grid=grid, **(dict(steps=steps) if steps else {}))
        start = time.perf_counter()
        runs = [flow.c2i(model, embedder, y[i:i + chunk], z=z[i:i + chunk], **kw) for i in range(0, len(y), chunk)]
        synchronize(device)
        c2i_seconds = time.perf_counter() - start
        images = evaluate.quantise(torch.cat([x for x, _ in runs]))  # as evaluate.py scores them
        features = evaluate.inception_features(inception, images, batch_size=chunk // 2)
        fid = evaluate.frechet_distance(*evaluate.feature_stats(features.numpy()), *real_stats)
        latents = torch.cat([flow.i2c(model, embedder, x_test[i:i + chunk], **kw)[0]
                             for i in range(0, len(x_test), chunk)])
        pred_l2, pred_cos = embedder.decode(latents)
        row = dict(solver=solver, steps=steps, time_grid=grid, nfe=runs[0][1], fid=fid,
                   c2i_class_acc=(evaluate.classify(classifier, images) == y.cpu()).float().mean().item(),
                   i2c_acc_l2=(pred_l2 == y_test).float().mean().item(),
                   i2c_acc_cos=(pred_cos == y_test).float().mean().item(), c2i_seconds=c2i_seconds)
        report["results"].append(row)
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        write_json(report, args.json)
        if args.plot:
            plot_fid_vs_nfe(report["results"], args.plot)
    write_json(report, args.json)
    return report


def plot_fid_vs_nfe(results, path, width=760, height=460):
    """FID against NFE, both axes log-scaled; colour = solver, marker = time grid."""
    from PIL import Image, ImageDraw
    points = [r for r in results if r["fid"] > 0]
    left, right, top, bottom = 60, 200, 20, 50
    nfes, fids = [math.log2(r["nfe"]) for r in points], [math.log10(r["fid"]) for r in points]
    x0, x1, y0, y1 = min(nfes) - 0.3, max(nfes) + 0.3, min(fids) - 0.05, max(fids) + 0.05

    def xy(nfe, fid):
        return (left + (math.log2(nfe) - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (math.log10(fid) - y0) / (y1 - y0) * (height - top - bottom))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for e in range(math.ceil(x0), math.floor(x1) + 1):
        x, _ = xy(2**e, 10**y0)
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 8, height - bottom + 8), str(2**e), fill="black")
    ticks = [m * 10.0**e for e in range(math.floor(y0), math.ceil(y1) + 1) for m in (1, 2, 5)
             if y0 <= math.log10(m * 10.0**e) <= y1]
    for value in ticks if len(ticks) >= 3 else [10 ** (y0 + (y1 - y0) * k / 4) for k in range(5)]:
        _, y = xy(2**x0, value)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((left - 45, y - 6), f"{value:.3g}", fill="black")
    draw.text((width // 2 - 80, height - 22), "NFE (function evaluations)", fill="black")
    draw.text((5, 2), "FID", fill="black")
    colours = dict(euler="#1f77b4", midpoint="#d62728", rk4="#2ca02c", dopri5="#9467bd")
    reference = next((r["fid"] for r in points if (r["solver"], r["steps"], r["time_grid"]) == REFERENCE), None)
    if reference:
        _, y = xy(2**x0, 1.05 * reference)
        for x in range(left, width - right, 8):
            draw.line([x, y, x + 4, y], fill="gray")
        draw.text((left + 4, y - 12), "euler 40 + 5%", fill="gray")
    for i, grid in enumerate(TIME_GRIDS):
        for solver in SOLVERS:
            series = sorted((r["nfe"], r["fid"]) for r in points if r["solver"] == solver and r["time_grid"] == grid)
            if not series:
                continue
            xys = [xy(n, f) for n, f in series]
            if len(xys) > 1:
                draw.line(xys, fill=colours[solver], width=1 if i else 2)
            for x, y in xys:
                _marker(draw, i, x, y, colours[solver])
    for j, (solver, colour) in enumerate(colours.items()):
        draw.text((width - right + 12, top + 14 * j), solver, fill=colour)
    for i, grid in enumerate(TIME_GRIDS):
        _marker(draw, i, width - right + 16, top + 86 + 14 * i, "black")
        draw.text((width - right + 26, top + 80 + 14 * i), f"time grid {grid}", fill="black")
    image.save(path)


def _marker(draw, kind, x, y, colour, r=4):
    """0 circle, 1 square, 2 triangle, 3 diamond: one per time grid."""
    if kind < 2:
        (draw.ellipse, draw.rectangle)[kind]([x - r, y - r, x + r, y + r], fill=colour)
    else:
        corners = [(x - r, y + r), (x, y - r), (x + r, y + r)] if kind == 2 else [(x, y - r), (x + r, y), (x, y + r),
                                                                                (x - r, y)]
        draw.polygon(corners, fill=colour)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny presets at batch 4 in train.py's precision, a few steps, no compile")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", nargs="+", choices=tuple(PRESET_DATASET),
                   help="default: all on a GPU, tiny on a CPU")
    p.add_argument("--batch-size", type=int, help="default: the preset's on a GPU, 16 on a CPU")
    p.add_argument("--compile", choices=("off", "on", "both"), help="default: both on a GPU, else off")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32", "both"),
                   help="default: both; auto (train.py's choice for the device) with --quick")
    p.add_argument("--checkpoint", help="time sampling with this trained model (default: random weights)")
    p.add_argument("--windows", type=int, default=5, help="timed windows per configuration (median)")
    p.add_argument("--window-seconds", type=float, default=0.5, help="length of one timed window")
    p.add_argument("--time-budget", type=float, default=0, help="seconds; later configurations are skipped")
    p.add_argument("--json", default="bench.json")
    p.add_argument("--nfe-sweep", metavar="CHECKPOINT", help="FID / accuracies against NFE for this model")
    p.add_argument("--num-samples", type=int, default=5000, help="sweep: generated images per setting")
    p.add_argument("--num-i2c", type=int, default=2000, help="sweep: test images for I2C accuracy")
    p.add_argument("--num-real", type=int, default=10000, help="sweep: test images for the FID reference")
    p.add_argument("--data-dir", default="data", help="sweep and loss curves: where MNIST is")
    p.add_argument("--inception", help="sweep: FID Inception weights file (default: evaluate.load_inception's)")
    p.add_argument("--settings", nargs="+", type=sweep_setting, metavar="SOLVER:STEPS:GRID",
                   help="sweep only these, e.g. euler:40:uniform midpoint:8:ends dopri5 (default: all, best first)")
    p.add_argument("--plot", default="nfe_sweep.png", help="sweep: PNG of FID against NFE")
    p.add_argument("--loss-curves", type=int, metavar="STEPS",
                   help="fixed-seed loss curves of the tiny presets on MNIST: eager vs NHWC vs compiled")
    args = p.parse_args()
    device = torch.device(args.device)
    full = device.type == "cuda" and not args.quick
    args.presets = args.presets or (("mnist", "cifar", "imagenet", "tiny") if full else ("tiny",))
    args.batch_size = args.batch_size or (4 if args.quick else None if device.type == "cuda" else 16)
    args.compile = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile or ("both" if full else "off")]
    if args.nfe_sweep:
        nfe_sweep(args, device)
        return
    if args.loss_curves:
        loss_curves(args, device)
        return
    report = run_benchmarks(args, device)
    print(f"\n{report['device']} | torch {report['torch']} | {report['threads']} threads | matmul "
          + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in report["matmul_tflops"].items()))
    for row in report["training"]:
        print(format_row(row))
    for row in report["sampling"]:
        print(f"sampling {row['solver']:8s} steps {row['steps']} NFE {row['nfe']:3d}: "
              f"{row['seconds_per_batch']:.3f} s per batch of {row['batch_size']}")
    print(f"FID Inception features: {report['inception']['img_per_s']:.1f} img/s")
    if report["skipped"]:
        print(f"{len(report['skipped'])} configurations skipped by --time-budget")
    write_json(report, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
