"""Pictures of a flow and its evaluation: sample grids, I2C reads, GIFs, FID against passes, confusions, curves."""
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid, save_image

import data
from devices import is_main_process, run_sharded

PNG = dict(normalize=True, value_range=(-1, 1), padding=1)  # [-1, 1] -> black..white; latents beyond +-1 clamp


def save_c2i_grid(model, embedder, flow, args, path, device='cpu', classes=None, num_per_class=8, seed=0,
                  sharded=False, **kw):
    """num_per_class images of each class, a row per class; kw: flow.integrate's sampler. With sharded=True
    (under torchrun) the processes split the work and rank 0 writes. Returns (images, labels, nfe)."""
    y = torch.tensor(classes or range(args['num_classes']), device=device).repeat_interleave(num_per_class)
    z = embedder(y, torch.Generator(device).manual_seed(seed))  # all latents, on every process
    images, nfe = run_sharded(lambda zz, yy: flow.c2i(model, embedder, yy, z=zz, **kw), z, y, sharded=sharded)
    if is_main_process():
        save_image(images, path, nrow=num_per_class, **PNG)
    return images, y, nfe


def save_i2c_grid(model, embedder, flow, args, path, device='cpu', num_per_class=4, num_samples=None, data_dir=None,
                  sharded=False, **kw):
    """I2C on the first num_samples (default: the picture's) of data.balanced_subset's test images, drawn as a row
    per class of num_per_class (draw_i2c_reads). Returns their latents, labels and reads (pred_l2, pred_cos)."""
    test_images, test_labels = data.load_test_set(args, data_dir)
    num_drawn = num_per_class * args['num_classes']
    scored = slice(num_samples or num_drawn)
    indices = data.balanced_subset(test_labels, max(num_samples or 0, num_drawn))  # any prefix is class-balanced
    latents, _ = run_sharded(lambda images: (torch.cat([flow.i2c(model, embedder, chunk, **kw)[0]
                                                        for chunk in images.split(500)]), 0),
                             data.to_unit_range(test_images[indices]).to(device), sharded=sharded)
    (pred_l2, pred_cos), labels = embedder.decode(latents), test_labels[indices].to(device)
    if is_main_process():
        rows = torch.argsort(labels[:num_drawn].cpu(), stable=True)  # a row per class
        draw_i2c_reads(test_images[indices[rows]], labels[rows], pred_l2[rows], path, nrow=num_per_class)
    return dict(latents=latents[scored], labels=labels[scored], pred_l2=pred_l2[scored], pred_cos=pred_cos[scored])


def draw_i2c_reads(images, labels, predicted, path, nrow):
    """Each uint8 image framed green where I2C read its class right, red where wrong, the class read to its right."""
    n, _, h, w = images.shape
    picture = Image.new('RGB', (nrow * (w + 24), -(-n // nrow) * (h + 4)), 'white')
    for i, (image, label, read) in enumerate(zip(images.cpu(), labels.tolist(), predicted.tolist())):
        x, y, colour = i % nrow * (w + 24), i // nrow * (h + 4), (0, 160, 0) if read == label else (220, 0, 0)
        picture.paste(ImageOps.expand(to_pil_image(image).convert('RGB'), border=2, fill=colour), (x, y))  # framed
        ImageDraw.Draw(picture).text((x + w + 7, y + h // 2 - 6), str(read), fill=colour)
    picture.save(path)


def save_trajectory(c2i, i2c, path):
    """z_t, (n, T, C, H, W) each way: to a PNG a row each; to a .gif a frame per time, C2I then I2C, ends held 1 s."""
    rows = c2i if i2c is None else torch.cat([c2i, i2c])
    if not str(path).endswith('.gif'):
        return save_image(rows.flatten(0, 1), path, nrow=rows.shape[1], **PNG)
    frames = [to_pil_image(make_grid(z, nrow=len(c2i), **PNG)) for way in rows.split(len(c2i)) for z in way.unbind(1)]
    durations = [1000 if (k + 1) % rows.shape[1] == 0 else 150 for k in range(len(frames))]  # milliseconds
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)


def plot_fid_against_nfe(results, path, width=760, height=460, margin=60):
    """FID against network passes per image, both axes log-scaled; a line per (solver, time grid, cfg)."""
    points = [r for r in results if r['fid'] > 0]
    xs, ys = [math.log2(r['network_passes_c2i']) for r in points], [math.log10(r['fid']) for r in points]
    x0, x1, y0, y1 = min(xs) - 0.3, max(xs) + 0.3, min(ys) - 0.05, max(ys) + 0.05
    right = width - 200  # the legend's left
    series = lambda r: (r['solver'], r['time_grid'], r['cfg_scale'])  # a line each

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
    for i, (solver, grid, cfg) in enumerate(sorted(set(map(series, points)))):
        xys = sorted(xy(r['network_passes_c2i'], r['fid']) for r in points if series(r) == (solver, grid, cfg))
        draw.line(xys, fill=colours[solver], width=2)
        for x, y in xys:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[solver])
        draw.text((right + 10, margin // 3 + 14 * i), f'{solver} {grid or ""} cfg {cfg:g}', fill=colours[solver])
    image.save(path)


def plot_confusion(result, path, grid=400, left=30, top=40):
    """The result's C2I and I2C confusion matrices (those it has) side by side, shaded by row-normalised counts."""
    panels = [("C2I: rows requested class, columns classifier's label", result.get('c2i_confusion')),
              ('I2C: rows true class, columns nearest mean (L2)', result.get('i2c_confusion_l2'))]
    panels = [(title, np.asarray(counts)) for title, counts in panels if counts is not None]
    cell, width = grid // len(panels[0][1]), left + grid + 10
    image = Image.new('RGB', (width * len(panels), top + grid + 20), 'white')
    draw = ImageDraw.Draw(image)
    for x0, (title, counts) in zip(range(left, image.width, width), panels):  # a panel every `width` pixels
        draw.text((x0, 4), title, fill='black')
        draw.text((x0, top + grid + 4), f"cfg {result['cfg_scale']:g}, {result['solver']} {result['steps'] or ''}",
                  fill='black')
        for i in range(0, len(counts), max(1, len(counts) // 10)):  # class numbers along both axes
            draw.text((x0 + i * cell + 2, top - 14), str(i), fill='black')
            draw.text((x0 - 24, top + i * cell + 2), str(i), fill='black')
        for (i, j), share in np.ndenumerate(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)):
            x, y, level = x0 + j * cell, top + i * cell, round(255 * (1 - share))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(level, level, 255), outline='#cccccc')
            if len(counts) <= 20:
                draw.text((x + 3, y + cell // 3), str(counts[i, j]), fill='white' if share > 0.5 else 'black')
    image.save(path)


def plot_learning_curve(points, path, panel=360, margin=50):
    """Quality against training minutes, from a run's kept snapshots: points = [(minutes, result)], results
    as evaluate.py writes them. Left: C2I class-consistency per cfg and I2C accuracy (%); right: FID per cfg."""
    colours = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e']
    cfgs = sorted({r['cfg_scale'] for _, r in points})
    lines = [[(f'C2I cfg {w:g}', [(m, 100 * r['c2i_class_acc']) for m, r in points if r['cfg_scale'] == w])
              for w in cfgs] + [('I2C (ODE)', [(m, 100 * r['i2c_acc_l2']) for m, r in points
                                                if r['cfg_scale'] == cfgs[0] and 'i2c_acc_l2' in r])],
             [(f'FID cfg {w:g}', [(m, r['fid']) for m, r in points if r['cfg_scale'] == w]) for w in cfgs]]
    image = Image.new('RGB', (2 * (panel + 2 * margin), panel + 2 * margin), 'white')
    draw = ImageDraw.Draw(image)
    x_max = max(m for m, _ in points)
    for left, title, panel_lines in zip((margin, 3 * margin + panel), ('accuracy, %', 'FID'), lines):
        ys = [y for _, xy in panel_lines for _, y in xy]
        y0, y1 = (min(min(ys), 80.0), 100.0) if title.startswith('acc') else (0.0, max(ys) * 1.05)
        to_px = lambda x, y: (left + x / x_max * panel, margin + (y1 - y) / (y1 - y0) * panel)
        draw.rectangle([left, margin, left + panel, margin + panel], outline='black')
        draw.text((left, margin - 30), f'{title} against training minutes (x: 0 to {x_max:.1f})', fill='black')
        for y in np.linspace(y0, y1, 5):
            draw.text((left - 40, to_px(0, y)[1] - 6), f'{y:.0f}', fill='black')
        for i, (name, xy) in enumerate(panel_lines):
            pixels = [to_px(x, y) for x, y in sorted(xy)]
            draw.line(pixels, fill=colours[i], width=2)
            for x, y in pixels:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[i])
            draw.text((left + 8, margin + panel + 8 + 12 * i), f'{name}: {max(xy)[1]:.1f} at the end', fill=colours[i])
    image.save(path)
