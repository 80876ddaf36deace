"""The privacy ledger as an inline SVG bar chart, drawn on the server: no script, no outside asset.

One bar per run: the ledger's epsilon after that run (the ledger spans every run of the
site, so the bars only grow), against the site's ceiling drawn as a dashed line.  Every
text in it is escaped.
"""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 16, 16, 40


def _y(value: float, top: float) -> float:
    """Value -> y in the plot area (0 at the bottom, ``top`` at the top)."""
    span = HEIGHT - TOP - BOTTOM
    return TOP + span * (1 - min(value, top) / top) if top > 0 else HEIGHT - BOTTOM


def ledger_svg(runs: list[tuple[str, float, float]], ceiling: float | None) -> str:
    """``runs``: (run id, epsilon after it, time), oldest first; ``ceiling``: the site's epsilon ceiling."""
    top = max([e for _, e, _ in runs] + [ceiling or 0.0, 1e-9]) * 1.15
    parts = [f'<svg class="ledger" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>epsilon spent per run against the ceiling</title>',
             f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" class="axis"/>',
             f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" class="axis"/>']
    for tick in (0.0, top / 2.3, top / 1.15):  # zero, half and all of the tallest value
        y = _y(tick, top)
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{tick:.2f}</text>')
    slot = (WIDTH - LEFT - RIGHT) / max(len(runs), 1)
    bar = min(slot * 0.6, 56.0)
    for i, (run, eps, _) in enumerate(runs):
        mid, y = LEFT + (i + 0.5) * slot, _y(eps, top)
        over = ceiling is not None and eps > ceiling
        parts.append(f'<rect x="{mid - bar / 2:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{HEIGHT - BOTTOM - y:.1f}" '
                     f'class="{"bar over" if over else "bar"}"><title>run {escape(run)}: epsilon {eps:.3f}</title>'
                     '</rect>')
        parts.append(f'<text x="{mid:.1f}" y="{y - 4:.1f}" text-anchor="middle" class="value">{eps:.2f}</text>')
        parts.append(f'<text x="{mid:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" '
                     f'class="tick">run {escape(run[-8:])}</text>')
    if ceiling is not None:
        y = _y(ceiling, top)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="ceiling"/>')
        parts.append(f'<text x="{WIDTH - RIGHT}" y="{y - 5:.1f}" text-anchor="end" class="ceiling-label">'
                     f'ceiling {ceiling:g}</text>')
    if not runs:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="tick">'
                     'no DP round recorded yet</text>')
    parts.append("</svg>")
    return "".join(parts)
