"""Self-contained HTML pages for run and sweep reports: inline CSS, plots inlined as PNG data
URIs, no script and no external asset, so a page can be mailed or archived as one file."""
from __future__ import annotations

import base64
import html
import os

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#1d1d1f;
padding:0 1em}
h1{font-size:1.5em;border-bottom:2px solid #4a6fa5;padding-bottom:.3em}h2{font-size:1.15em;margin-top:1.8em;color:#2f4f7f}
table{border-collapse:collapse;margin:.5em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f0f3f8}
tr:nth-child(even) td{background:#fafbfc}pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:12px}
.banner{background:#fff4e5;border-left:4px solid #d9822b;padding:.5em 1em;margin:.4em 0;font-weight:600}
.wide{overflow-x:auto}img{max-width:100%;margin:.5em 0;border:1px solid #e1e4e8}footer{margin-top:3em;color:#777;font-size:12px}
"""


def png_tag(path: str) -> str:
    """An <img> holding the PNG file itself (base64), or nothing when there is no such file."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,{data}">'


def page(title: str, sections: list[tuple[str, str]], banners: list[str] = ()) -> str:
    """A whole page: ``banners`` (plain text, shown first, highlighted), then ``sections``:
    (heading, HTML body) pairs, bodies already escaped."""
    from .. import __version__

    body = "".join(f'<div class="banner">{html.escape(b)}</div>\n' for b in banners)
    body += "".join(f"<h2>{html.escape(h)}</h2>\n<div class=\"wide\">{b}</div>\n" for h, b in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n{body}"
            f"<footer>nasq {__version__}</footer></body></html>\n")
