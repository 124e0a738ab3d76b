"""Pictures for people, drawn without a plotting library: a PNG strip of an input's noisy copies
and the certified-accuracy curve of a labelled certify job as hand-written SVG.

numpy and Pillow only (the API's own dependencies); nothing here reads Redis or files.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from smoothcert.service.core.accuracy import certified_accuracy_steps

STRIP_MIN_SIDE, STRIP_GAP = (
    64,
    2,
)  # px: a copy is upscaled to at least this side; white gap between copies


def sample_strip_png(copies: np.ndarray) -> bytes:
    """``copies`` (K, C, H, W) uint8 as one PNG, the K copies side by side.

    Each copy is upscaled by the whole factor ``max(1, STRIP_MIN_SIDE // max(H, W))`` (nearest
    neighbour, so an 8×8 digit's pixels stay square), with ``STRIP_GAP`` white pixels between
    copies: the image is ``K·W·s + (K−1)·STRIP_GAP`` wide and ``H·s`` high. One channel is grey,
    three are RGB; any other count shows the first channel in grey.
    """
    k, c, h, w = copies.shape
    scale = max(1, STRIP_MIN_SIDE // max(h, w))
    pixels = copies if c in (1, 3) else copies[:, :1]
    big = pixels.repeat(scale, axis=2).repeat(scale, axis=3).transpose(0, 2, 3, 1)  # K, H·s, W·s, C
    gap = np.full((h * scale, STRIP_GAP, big.shape[3]), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, copy in enumerate(big):
        parts.extend([gap, copy] if i else [copy])
    strip = np.concatenate(parts, axis=1)
    image = Image.fromarray(
        strip[:, :, 0] if strip.shape[2] == 1 else strip
    )  # uint8: grey (L) or RGB
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


WIDTH, HEIGHT = 560, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 40, 56  # margins, px


def certified_accuracy_points(rows: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """The step curve of certified accuracy against radius as (radius, accuracy) corners from
    radius 0 (:func:`smoothcert.service.core.accuracy.certified_accuracy_steps`): the share of rows
    predicted right (``prediction == label``) with ``radius`` ≥ r. The curve ends at the largest
    radius."""
    correct = [r["prediction"] is not None and r["prediction"] == r["label"] for r in rows]
    radius = [float(r["radius"]) if right else 0.0 for r, right in zip(rows, correct)]
    return certified_accuracy_steps(correct, radius)


def accuracy_curve_svg(rows: Sequence[dict[str, Any]], radius_cap: float | None, title: str) -> str:
    """The certified-accuracy curve of labelled certify ``rows`` as an SVG document: accuracy 0 to 1
    against radius 0 to past the largest radius and ``radius_cap`` (a dashed line, class
    ``radius-cap``, where no certificate can reach), axis labels, ticks and ``title``."""
    points = certified_accuracy_points(rows)
    x_max = max([p[0] for p in points] + [radius_cap or 0.0]) * 1.08 or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(r: float) -> float:
        return LEFT + plot_w * r / x_max

    def y(a: float) -> float:
        return TOP + plot_h * (1 - a)

    corners = points + [(x_max, points[-1][1])]
    path = " ".join(
        f"{'M' if i == 0 else 'L'}{x(r):.1f},{y(a):.1f}" for i, (r, a) in enumerate(corners)
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2:.0f}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    for tick in np.linspace(0, 1, 6):
        parts.append(
            f'<line x1="{LEFT - 4}" y1="{y(tick):.1f}" x2="{LEFT + plot_w}" y2="{y(tick):.1f}" '
            'stroke="#ddd"/>'
        )
        parts.append(
            f'<text x="{LEFT - 8}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.1f}</text>'
        )
    for tick in _ticks(x_max):
        parts.append(
            f'<line x1="{x(tick):.1f}" y1="{TOP + plot_h}" x2="{x(tick):.1f}" y2="{TOP + plot_h + 4}" '
            'stroke="black"/>'
        )
        parts.append(
            f'<text x="{x(tick):.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{tick:g}</text>'
        )
    parts += [
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="black"/>',
        f'<text class="x-label" x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 12}" text-anchor="middle">'
        "radius (ℓ2, in [0,1] pixel units)</text>",
        f'<text class="y-label" x="16" y="{TOP + plot_h / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {TOP + plot_h / 2:.0f})">certified accuracy</text>',
    ]
    if radius_cap is not None:
        parts += [
            f'<line class="radius-cap" x1="{x(radius_cap):.1f}" y1="{TOP}" x2="{x(radius_cap):.1f}" '
            f'y2="{TOP + plot_h}" stroke="#c0392b" stroke-dasharray="5,4"/>',
            f'<text class="radius-cap-label" x="{x(radius_cap) - 4:.1f}" y="{TOP + 14}" text-anchor="end" '
            f'fill="#c0392b">radius cap {radius_cap:.4g}</text>',
        ]
    parts += [
        f'<path class="curve" d="{path}" fill="none" stroke="#1f5fa8" stroke-width="2"/>',
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def _ticks(x_max: float) -> list[float]:
    """About five round radii in [0, x_max]."""
    step = 10 ** np.floor(np.log10(x_max / 5))
    for factor in (1, 2, 5, 10):
        if x_max / (step * factor) <= 6:
            step *= factor
            break
    return [round(float(t), 10) for t in np.arange(0, x_max + 1e-12, step)]
