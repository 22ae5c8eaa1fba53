"""``report.html``: one self-contained page per evaluation (every image inlined, nothing fetched from a network).

It shows the context and metrics tables, the ROC and score-histogram plots, and galleries of verdict tiles
(:mod:`dgmood.evaluation.tiles`): the most atypical in-distribution test images and, per OOD set, the images
that look most in-distribution, each with its anomaly map and reasons. A small script records on ``<body>``
how many images decoded (``data-images-loaded`` of ``data-images``) and any script error (``data-errors``), so
a headless browser can check the page.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Mapping, Sequence

from dgmood.evaluation.tiles import png_data_uri

__all__ = ["Gallery", "render_html", "write_html"]

Gallery = tuple[str, str, Sequence[tuple[bytes, str]]]
"""(title, one-line explanation, [(PNG bytes, caption), ...])."""

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; } figcaption { font-size: 11px; max-width: 360px; }
img.plot { max-width: 100%; }
"""

_CHECK = """
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message || e)); }, true);
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.images = String(imgs.length);
  document.body.dataset.imagesLoaded = String(ok);
  document.body.dataset.errors = String(window.__errors.length);
});
"""


def _table(rows: Sequence[Mapping]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_html(title: str, context: Mapping, rows: Sequence[Mapping], plots: Mapping[str, Path],
                galleries: Sequence[Gallery]) -> str:
    """The page as a string.

    Args:
        title: Page title.
        context: Label → value lines (training set, threshold, ...).
        rows: Metrics rows (dicts with the same keys).
        plots: Caption → PNG file, inlined.
        galleries: See :data:`Gallery`.
    """
    parts = [f"<h1>{html.escape(title)}</h1>",
             _table([{"": k, "value": v} for k, v in context.items()]), "<h2>Metrics</h2>", _table(rows)]
    for caption, path in plots.items():
        uri = png_data_uri(Path(path).read_bytes())
        parts.append(f"<h2>{html.escape(caption)}</h2><img class='plot' alt='{html.escape(caption)}' src='{uri}'>")
    for name, note, items in galleries:
        figures = "".join(f"<figure><img alt='{html.escape(c)}' src='{png_data_uri(png)}'>"
                          f"<figcaption>{html.escape(c)}</figcaption></figure>" for png, c in items)
        parts.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(note)}</p><div class='tiles'>{figures}</div>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style><script>{_CHECK}</script></head><body>{''.join(parts)}</body></html>")


def write_html(path: Path, title: str, context: Mapping, rows: Sequence[Mapping], plots: Mapping[str, Path],
               galleries: Sequence[Gallery]) -> Path:
    """:func:`render_html` written atomically to ``path``."""
    from dgmood.utils.files import atomic_write

    text = render_html(title, context, rows, plots, galleries)
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
