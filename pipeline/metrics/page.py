"""Page pieces shared by the segment report (``pipeline/metrics/report.py``) and the tune-crf report (``pipeline/tune/``).

One stylesheet, tables, figures beside tables, and the escaping that keeps untrusted text (image ids, class names,
URIs) inert: HTML-escaped in the page, Markdown-escaped in ``report.md``, plain text (no math, no TeX) in
matplotlib figures, and guarded against spreadsheet formula injection in CSV cells.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "CSS",
    "esc",
    "md_escape",
    "csv_cell",
    "plain_text_figures",
    "figure_png",
    "html_table",
    "md_table",
    "img_tag",
    "pair",
    "card",
    "page",
    "Table",
    "Fig",
    "Pair",
    "Gallery",
    "Section",
    "Headline",
    "placed_figures",
    "render_md",
    "render_page",
]

# Wide enough for two columns at 1280 px; every child may shrink (min-width: 0) so nothing widens the page.
CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;margin:0 auto;padding:1em 1.5em 3em;max-width:1240px;color:#222;
 line-height:1.35}
h1{margin:0.2em 0 0.1em;font-size:1.6em}
h2{margin:1.6em 0 0.4em;border-bottom:1px solid #ddd;padding-bottom:0.15em}
h3{margin:0.8em 0 0.3em;font-size:1em}
table{border-collapse:collapse;margin:0.3em 0 1em;max-width:100%}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right;overflow-wrap:anywhere}
td:first-child,th:first-child{text-align:left}
th{background:#f0f0f0}
img{max-width:100%;height:auto;border:1px solid #eee}
code{overflow-wrap:anywhere}
.where{color:#444;margin:0.2em 0 0.8em;overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(290px,1fr));gap:0.7em;margin:0.6em 0}
.card{border:1px solid #d8d8d8;border-radius:6px;padding:0.5em 0.8em;background:#fafafa;min-width:0;
 overflow-wrap:anywhere}
.card .label{color:#555;font-size:0.85em}
.card .big{font-size:1.45em;font-weight:600}
.card .small{font-size:0.85em;color:#333}
.gain{color:#1a7f37}
.loss{color:#b42318}
.pair{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start}
.pair>*{min-width:0;flex:1 1 420px}
.pair>.narrow{flex:0 1 auto}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:0.8em}
.gallery figure{margin:0;min-width:0}
figcaption{font-size:0.85em;color:#333;overflow-wrap:anywhere}
nav{font-size:0.9em;margin:0.4em 0}
nav a{margin-right:1em}
.note{color:#555;font-size:0.88em;overflow-wrap:anywhere}
"""

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~$<>&])")  # inline syntax; cells never start a line
_MD_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
_CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def esc(value: Any) -> str:
    """Text for HTML (element content and quoted attributes)."""
    return html.escape(str(value), quote=True)


def md_escape(value: Any) -> str:
    """Text for Markdown: one line, every inline-syntax character backslash-escaped, and <, >, & as entities (a
    Markdown renderer passes raw HTML through)."""
    text = " ".join(str(value).splitlines())
    return _MD_SPECIAL.sub(lambda m: _MD_ENTITIES.get(m.group(1), "\\" + m.group(1)), text)


def csv_cell(value: str) -> str:
    """A CSV text cell a spreadsheet shows as text: a leading ``'`` when it starts with = + - @ tab or CR
    (OWASP's CSV-injection rule), so an id like ``=HYPERLINK(...)`` is never evaluated as a formula."""
    return "'" + value if value.startswith(_CSV_TRIGGERS) else value


@contextlib.contextmanager
def plain_text_figures() -> Iterator[None]:
    """Build figures inside this: text is shown as given (``$a$`` is not math text, no TeX)."""
    with matplotlib.rc_context({"text.usetex": False, "text.parse_math": False}):
        yield


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)  # explicit Agg canvas: no pyplot, works headless
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def html_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], *, table_id: str | None = None) -> str:
    attr = f' id="{esc(table_id)}"' if table_id else ""
    out = [f"<table{attr}>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    return "\n".join(out + ["</table>"])


def md_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows] + [""]


def img_tag(name: str, png: bytes, *, alt: str | None = None, max_width_px: int | None = None) -> str:
    style = f' style="max-width:min(100%,{max_width_px}px)"' if max_width_px else ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt or name)}" id="fig-{esc(name)}"{style} src="data:image/png;base64,{data}">'


def pair(left: str, right: str, *, narrow_left: bool = True) -> str:
    """Two blocks side by side (a table and its figure), stacked when the page is narrow."""
    cls = ' class="narrow"' if narrow_left else ""
    return f'<div class="pair"><div{cls}>{left}</div><div>{right}</div></div>'


def card(label: str, big_html: str, small_html: str = "", *, card_id: str | None = None) -> str:
    """A headline box; ``big_html`` and ``small_html`` are HTML the caller built from escaped text."""
    attr = f' id="{esc(card_id)}"' if card_id else ""
    small = f'<div class="small">{small_html}</div>' if small_html else ""
    return f'<div class="card"{attr}><div class="label">{esc(label)}</div><div class="big">{big_html}</div>{small}</div>'


def page(title: str, body: Sequence[str]) -> str:
    """A self-contained page: inline CSS, no scripts, no external resources."""
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
    ]
    return "\n".join([*head, *body, "</body></html>"])


# -- a report as data: sections of blocks, rendered to Markdown and to HTML alike ----------------------------------
@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    title: str = ""
    table_id: str | None = None


@dataclass(frozen=True)
class Fig:
    name: str
    max_width_px: int | None = None


@dataclass(frozen=True)
class Pair:
    """Blocks on the left (tables, usually) beside blocks on the right (their figure)."""

    left: list
    right: list


@dataclass(frozen=True)
class Gallery:
    items: list[tuple[str, str]]  # (figure name, caption text)


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    blocks: list  # Table | Fig | Pair | Gallery | str (a note)


@dataclass(frozen=True)
class Headline:
    """One headline box: ``parts`` are (text, element id or None), joined into its big line."""

    label: str
    parts: list[tuple[str, str | None]]
    small: str = ""


def _walk(blocks: Sequence) -> list:
    out: list = []
    for b in blocks:
        out += _walk([*b.left, *b.right]) if isinstance(b, Pair) else [b]
    return out


def placed_figures(sections: Sequence[Section]) -> set[str]:
    names: set[str] = set()
    for s in sections:
        for b in _walk(s.blocks):
            if isinstance(b, Fig):
                names.add(b.name)
            elif isinstance(b, Gallery):
                names.update(n for n, _ in b.items)
    return names


def _md_block(block: Any) -> list[str]:
    if isinstance(block, str):
        return [md_escape(block), ""]
    if isinstance(block, Table):
        return ([f"### {md_escape(block.title)}", ""] if block.title else []) + md_table(
            block.header, block.rows
        )
    if isinstance(block, Fig):
        return [f"![{block.name}](figures/{block.name}.png)", ""]
    if isinstance(block, Pair):
        return [line for b in (*block.left, *block.right) for line in _md_block(b)]
    out = []
    for name, caption in block.items:
        out += [md_escape(caption), "", f"![{name}](figures/{name}.png)", ""]
    return out


def render_md(title: str, where: Sequence[str], headline: Sequence[Headline], sections: Sequence[Section],
              figure_names: Sequence[str]) -> str:  # fmt: skip
    """Markdown with the page's order: title, where, headline list, sections; unplaced figures last."""
    out = [f"# {md_escape(title)}", "", md_escape(" ".join(where)), ""]
    for h in headline:
        line = f"- **{md_escape(h.label)}**: {md_escape(''.join(t for t, _ in h.parts))}"
        out.append(line + (f" ({md_escape(h.small)})" if h.small else ""))
    out.append("")
    for section in sections:
        out += [f"## {md_escape(section.title)}", ""]
        for block in section.blocks:
            out += _md_block(block)
    rest = [n for n in figure_names if n not in placed_figures(sections)]
    if rest:
        out += ["## More figures", ""] + [line for n in rest for line in _md_block(Fig(n))]
    return "\n".join(out)


def _html_block(block: Any, figs: dict[str, bytes]) -> str:
    if isinstance(block, str):
        return f'<p class="note">{esc(block)}</p>'
    if isinstance(block, Table):
        title = f"<h3>{esc(block.title)}</h3>" if block.title else ""
        return title + html_table(block.header, block.rows, table_id=block.table_id)
    if isinstance(block, Fig):
        return img_tag(block.name, figs[block.name], max_width_px=block.max_width_px)
    if isinstance(block, Pair):
        left = "".join(_html_block(b, figs) for b in block.left)
        return pair(left, "".join(_html_block(b, figs) for b in block.right))
    items = [
        f"<figure>{img_tag(name, figs[name])}<figcaption>{esc(caption)}</figcaption></figure>"
        for name, caption in block.items
    ]
    return '<div class="gallery">' + "".join(items) + "</div>"


def render_page(title: str, where: Sequence[str], headline: Sequence[Headline], sections: Sequence[Section],
                figs: dict[str, bytes]) -> str:  # fmt: skip
    """The self-contained HTML page: the answer (where, headline boxes, section links) on the first screen."""
    cards = []
    for h in headline:
        big = "".join(f'<span id="{esc(i)}">{esc(t)}</span>' if i else esc(t) for t, i in h.parts)
        cards.append(card(h.label, big, esc(h.small)))
    body = [
        f'<header id="answer"><h1>{esc(title)}</h1>',
        f'<p class="where" id="where">{esc(" ".join(where))}</p>',
        f'<div class="cards">{"".join(cards)}</div>',
        "<nav>"
        + "".join(f'<a href="#{esc(s.anchor)}">{esc(s.title)}</a>' for s in sections)
        + "</nav></header>",
    ]
    for section in sections:
        body.append(f'<section id="{esc(section.anchor)}"><h2>{esc(section.title)}</h2>')
        body += [_html_block(b, figs) for b in section.blocks]
        body.append("</section>")
    rest = [n for n in figs if n not in placed_figures(sections)]
    if rest:
        body += ["<section><h2>More figures</h2>"] + [img_tag(n, figs[n]) for n in rest] + ["</section>"]
    return page(title, body)
