"""The analysis' two figures, drawn with Pillow: preference.png (Fig. 6: win rates with their intervals, people and
each judge, per question) and correlation.png (Fig. 2: each patch's mean z-scored rating against each metric)."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

LEFT, PLOT_WIDTH, TOP, ROW, HEADER = 300, 560, 56, 26, 24  # preference.png layout, pixels
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
PANEL, MARGIN = 300, 56  # correlation.png: plot side and margin, pixels


def font(size=13):
    return ImageFont.load_default(size=size)


def x_of(value):
    """preference.png: the pixel column of a win rate."""
    return LEFT + value * PLOT_WIDTH


def preference_plot(results, path):
    """Draw the win rate of labels[0] over labels[1] per question, people first then each judge, each a dot with its
    95 % interval; a dashed line at ½. Returns [(question, who, x, y, colour)] of the dots drawn."""
    a, b = results["study"]["labels"]
    questions = list(dict.fromkeys([*results.get("pairwise", {})] +
                                   [q for judge in results.get("judge", {}).values() for q in judge]))
    series = [("people", results.get("pairwise", {}))] + [(f"judge {name}", v) for name, v in
                                                          results.get("judge", {}).items()]
    height = TOP + len(questions) * (HEADER + ROW * len(series)) + 50
    image = Image.new("RGB", (LEFT + PLOT_WIDTH + 40, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 10), f"Win rate of {a} over {b} (a tie counts 1/2), 95 % intervals", fill="black", font=font(16))
    bottom = height - 40
    for tick in (0, 0.25, 0.5, 0.75, 1):
        x = x_of(tick)
        draw.line([(x, TOP - 6), (x, bottom)], fill=(150, 150, 150) if tick == 0.5 else (230, 230, 230),
                  width=1)
        draw.text((x - 10, bottom + 6), f"{tick:g}", fill="black", font=font())
    dots, y = [], TOP
    for question in questions:
        draw.text((12, y + 4), question, fill="black", font=font(14))
        y += HEADER
        for k, (who, per_question) in enumerate(series):
            v, colour = per_question.get(question), COLOURS[k % len(COLOURS)]
            centre = y + ROW // 2
            if v is None or v.get("win_rate_a") is None:
                draw.text((24, centre - 7), f"{who}: no answers", fill=(120, 120, 120), font=font())
                y += ROW
                continue
            low, high = v["win_rate_a_ci95"]
            interval = "" if low is None else f" [{low:.2f}, {high:.2f}]"
            draw.text((24, centre - 7), f"{who}: {v['win_rate_a']:.2f}{interval}  n={v['n']}", fill=colour,
                      font=font())
            if low is not None:
                draw.line([(x_of(low), centre), (x_of(high), centre)], fill=colour, width=2)
            x = x_of(v["win_rate_a"])
            draw.ellipse([(x - 5, centre - 5), (x + 5, centre + 5)], fill=colour)
            dots.append((question, who, x, centre, colour))
            y += ROW
    image.save(path)
    return dots


def scale(values, start, length, flip=False):
    """Pixel positions of values spread over [start, start + length] (min to max; flipped for y)."""
    values = np.asarray(values, float)
    low, high = np.nanmin(values), np.nanmax(values)
    fraction = (values - low) / (high - low) if high > low else np.full(len(values), 0.5)
    return start + length * (1 - fraction if flip else fraction)


def correlation_plot(table, metrics, correlations, path):
    """One panel per metric: each patch's mean z-score (y) against the metric (x), with SRCC and PLCC in the title.
    Returns {metric: [(x, y)]} of the dots drawn."""
    width = len(metrics) * (PANEL + 2 * MARGIN)
    image = Image.new("RGB", (width, PANEL + 2 * MARGIN + 20), "white")
    draw = ImageDraw.Draw(image)
    scores = np.array([np.nan if row["mos_z"] is None else row["mos_z"] for row in table], float)
    dots = {}
    for k, metric in enumerate(metrics):
        left, top = k * (PANEL + 2 * MARGIN) + MARGIN, MARGIN
        values = np.array([row[metric] for row in table], float)
        keep = np.isfinite(values) & np.isfinite(scores)
        draw.rectangle([(left, top), (left + PANEL, top + PANEL)], outline=(160, 160, 160))
        c = correlations.get(metric, {})
        text = f"{metric}: SRCC {c['srcc']:.2f}, PLCC {c['plcc']:.2f}" if c.get("srcc") is not None else metric
        draw.text((left, 12), text, fill="black", font=font(14))
        draw.text((left, top + PANEL + 8), f"{metric} (x)   mean z-scored rating (y)", fill="black", font=font())
        if not keep.any():
            continue
        xs, ys = scale(values[keep], left + 6, PANEL - 12), scale(scores[keep], top + 6, PANEL - 12, flip=True)
        for x, y in zip(xs, ys):
            draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=COLOURS[0])
        for v, x in ((np.nanmin(values[keep]), left), (np.nanmax(values[keep]), left + PANEL - 40)):
            draw.text((x, top + PANEL + 24), f"{v:.3g}", fill="black", font=font())
        dots[metric] = list(zip(xs.tolist(), ys.tolist()))
    image.save(path)
    return dots
