"""Show dataset-derived text as text: gene, cell and category names are never markup.

Datasets come from collaborators and public repositories, so a gene name, a cell name,
a cluster category, an obs column name or a file name can hold HTML or JavaScript
(``<img src=x onerror=...>``). Every such string that goes into an HTML or Markdown
pane passes through :func:`html_text` or :func:`markdown_text` first; Bokeh and Panel
widgets that take plain text (plot titles, ``Select`` options, Tabulator cells with
their default formatter, widget labels) already show it as text.
"""

from __future__ import annotations

import html
from typing import Any

from matplotlib.colors import is_color_like, to_hex

#: ASCII characters with a meaning in Markdown or HTML; everything else is shown as it is
_MARKDOWN_SPECIAL = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def html_text(value: Any) -> str:
    """Return ``value`` as HTML text: ``<``, ``>``, ``&`` and quotes become entities.

    Examples
    --------
    >>> html_text('<img src=x onerror="alert(1)">')
    '&lt;img src=x onerror=&quot;alert(1)&quot;&gt;'
    """
    return html.escape(str(value), quote=True)


def markdown_text(value: Any) -> str:
    """Return ``value`` as Markdown text that renders to exactly its characters.

    Every ASCII punctuation character and every control character becomes a numeric
    character reference (``<`` -> ``&#60;``). CommonMark shows a reference as the
    literal character, never as markup, so the text can open no tag, link, emphasis,
    heading, code span or math, and the renderer cannot turn it into a link; backslash
    escapes would not do, as they are literal inside code spans and leave ``&`` and
    entity names alone.

    Examples
    --------
    >>> markdown_text("*a*_b")
    '&#42;a&#42;&#95;b'
    """
    return "".join(
        f"&#{ord(c)};" if c in _MARKDOWN_SPECIAL or ord(c) < 0x20 or ord(c) == 0x7F else c  # noqa: PLR2004
        for c in str(value)
    )


def hex_colors(values: Any, n: int) -> list[str] | None:
    """Return ``values`` as ``#rrggbb`` colours, or None unless there are ``n`` or more valid ones.

    Colours stored in a dataset (``uns['clusters_colors']``) go into CSS and into Bokeh's
    colour mappers; only what matplotlib reads as a colour is kept, written as hex, so
    a stored value can neither break out of a ``style`` attribute nor break a plot.

    Examples
    --------
    >>> hex_colors(["red", "#00ff00"], 2)
    ['#ff0000', '#00ff00']
    >>> hex_colors(['red;"><script>', "blue"], 2) is None
    True
    """
    if values is None:
        return None
    colors = [str(v) for v in values]
    if len(colors) < n or not all(is_color_like(c) for c in colors):
        return None
    return [str(to_hex(c)) for c in colors]
