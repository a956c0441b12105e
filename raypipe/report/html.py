"""A tiny HTML builder for the self-contained report: escaped text, tables, embedded PNG figures, one page."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence

__all__ = ["esc", "fmt_num", "fmt_ci", "fmt_p", "table", "figure", "section", "page", "data_uri"]


def esc(value: object) -> str:
    """HTML-escaped text of any value."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_num(value: float | None, digits: int = 3) -> str:
    """Number with fixed decimals, or an en dash when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "\u2013"
    return f"{value:.{digits}f}"


def fmt_ci(entry: dict[str, float] | None, digits: int = 3) -> str:
    """`value (low-high)` from a metrics.json entry, as the papers print a 95% CI."""
    if not entry:
        return "\u2013"
    value, low, high = entry.get("value"), entry.get("ci_low"), entry.get("ci_high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return fmt_num(value, digits)
    return f"{fmt_num(value, digits)} ({fmt_num(low, digits)}\u2013{fmt_num(high, digits)})"


def fmt_p(p: float | None) -> str:
    """P value in journal style: `<.001`, `.04`, `.23`."""
    if p is None or not math.isfinite(p):
        return "\u2013"
    if p < 0.001:
        return "<.001"
    text = f"{p:.3f}" if p < 0.01 else f"{p:.2f}"
    return text[1:] if text.startswith("0") else text


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    caption: str | None = None,
    note: str | None = None,
    raw: bool = False,
    css_class: str = "",
) -> str:
    """An HTML table; cells are escaped unless `raw` (then they must already be safe HTML)."""
    cell = (lambda c: c) if raw else esc
    head = "".join(f"<th>{cell(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    foot = f'<p class="note">{esc(note)}</p>' if note else ""
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return (f'<div class="table-wrap"><table{cls}>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}\n</tbody></table>{foot}</div>")


def data_uri(png: bytes) -> str:
    """A base64 data URI for PNG bytes, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, caption: str, alt: str | None = None, filename: str | None = None) -> str:
    """An embedded PNG with a caption (and the name of its copy on disk)."""
    saved = f' <span class="file">({esc(filename)})</span>' if filename else ""
    return (f'<figure><img src="{data_uri(png)}" alt="{esc(alt or caption)}">'
            f"<figcaption>{esc(caption)}{saved}</figcaption></figure>")


def section(title: str, *parts: str, anchor: str | None = None) -> str:
    """A titled section of already-built HTML parts."""
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{esc(title)}</h2>\n" + "\n".join(p for p in parts if p) + "\n</section>"


_CSS = """
:root { --ink:#1d2430; --muted:#5b6675; --line:#d9dee5; --accent:#1f5fa8; --bg:#ffffff; --band:#f5f7fa; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background:var(--band); border-bottom:1px solid var(--line); padding:24px 40px 16px; }
header h1 { margin:0 0 4px; font-size:24px; }
header p { margin:2px 0; color:var(--muted); }
main { padding:8px 40px 40px; max-width:1600px; }
nav { margin-top:10px; } nav a { margin-right:14px; color:var(--accent); text-decoration:none; font-size:14px; }
h2 { font-size:19px; margin:32px 0 10px; padding-bottom:4px; border-bottom:2px solid var(--accent); }
h3 { font-size:16px; margin:20px 0 6px; }
.table-wrap { overflow-x:auto; margin:8px 0 18px; }
table { border-collapse:collapse; font-size:13px; font-variant-numeric: tabular-nums; }
caption { text-align:left; font-weight:600; padding:4px 0 8px; }
th, td { padding:5px 9px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { background:var(--band); border-top:1px solid var(--ink); border-bottom:1px solid var(--ink); }
th:first-child, td:first-child { text-align:left; }
tbody tr:nth-child(even) td { background:#fafbfc; }
tbody tr:last-child td { border-bottom:1px solid var(--ink); }
td.ref, span.ref { color:var(--muted); font-style:italic; }
.note { color:var(--muted); font-size:12.5px; margin:4px 0 0; max-width:1000px; }
ul.notes { color:var(--muted); font-size:13px; }
.figures { display:flex; flex-wrap:wrap; gap:18px; }
figure { margin:0; border:1px solid var(--line); border-radius:6px; padding:10px; background:#fff; }
figure img { display:block; max-width:100%; height:auto; }
figcaption { font-size:13px; color:var(--muted); margin-top:6px; max-width:560px; }
figcaption .file { font-family: ui-monospace, Menlo, monospace; font-size:11.5px; }
#render-errors { color:#a40000; }
"""

# Resource and script errors are written into the page itself, and every image's naturalWidth is recorded,
# so that a headless browser's --dump-dom shows whether the page rendered cleanly (no devtools protocol needed).
_CHECK_SCRIPT = """
(function () {
  function mark(msg) {
    var list = document.getElementById('render-errors');
    if (!list) { window.__pendingErrors = (window.__pendingErrors || []).concat([msg]); return; }
    var li = document.createElement('li'); li.className = 'render-error'; li.textContent = msg;
    list.appendChild(li); list.hidden = false;
  }
  window.addEventListener('error', function (e) {
    var t = e.target;
    mark(t && t !== window && t.tagName ? 'failed to load ' + t.tagName.toLowerCase() : 'script error: ' + e.message);
  }, true);
  document.addEventListener('securitypolicyviolation', function (e) { mark('blocked resource: ' + e.blockedURI); });
  window.addEventListener('load', function () {
    (window.__pendingErrors || []).forEach(mark);
    var imgs = document.images, broken = 0;
    for (var i = 0; i < imgs.length; i++) {
      imgs[i].setAttribute('data-natural-width', String(imgs[i].naturalWidth));
      if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) { broken++; mark('image not rendered: ' + imgs[i].alt); }
    }
    document.body.setAttribute('data-images', String(imgs.length));
    document.body.setAttribute('data-images-broken', String(broken));
    document.body.setAttribute('data-render-errors', String(document.querySelectorAll('.render-error').length));
    document.body.setAttribute('data-render-check', 'done');
  });
})();
"""

# Nothing outside the file may load: images only from data: URIs, inline style and script only.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def page(title: str, body: str, subtitle_lines: Sequence[str] = (), nav: Sequence[tuple[str, str]] = ()) -> str:
    """A complete self-contained HTML document (inline CSS and check script, no external resources)."""
    subtitle = "".join(f"<p>{esc(line)}</p>" for line in subtitle_lines)
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    nav_html = f"<nav>{links}</nav>" if links else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n<script>{_CHECK_SCRIPT}</script>\n</head>\n"
        f"<body>\n<header><h1>{esc(title)}</h1>{subtitle}{nav_html}</header>\n"
        '<main>\n<ul id="render-errors" hidden></ul>\n'
        f"{body}\n</main>\n</body>\n</html>\n"
    )
