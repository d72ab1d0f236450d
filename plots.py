"""Pictures of evaluation results, drawn with Pillow: FID against network passes, and confusion matrices."""
import math

import numpy as np
from PIL import Image, ImageDraw


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
    """The result's C2I and (if any) I2C confusion matrices side by side, shaded by row-normalised counts."""
    panels = [("C2I: rows requested class, columns classifier's label", result['c2i_confusion']),
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
