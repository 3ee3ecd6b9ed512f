"""Serve every script and stylesheet of the page from the app's own server, never from a CDN.

The app must work offline and on a machine that may not reach the internet. Bokeh and
Panel serve their files locally in ``server`` resource mode, but two paths still put
CDN addresses into a page:

- ``BOKEH_RESOURCES=cdn`` (or ``inline``) in the environment switches the whole page
  to the CDN; :func:`use_local_resources` pins the mode to ``server``.
- Panel points each component's stylesheets at its CDN until the page's HTML has been
  rendered, which records the local folder in the document's template variables.
  A session that is built without that step, such as the one Bokeh creates when the
  browser's websocket arrives after its first session was discarded as unused (which
  happened on a busy server, where a page took more than Bokeh's 15 s between its
  HTML and its websocket), kept the CDN addresses: 8 of 8 pages in one round of a
  load test asked cdn.holoviz.org for their CSS. :func:`use_local_resources` records
  the local folder as soon as the session starts.

Panel's ``Divider`` builds its model without that lookup, so its stylesheet stays on the
CDN in such a session; the app draws its dividers with :func:`divider` instead.

A pane whose model is outside the document falls back to the CDN as well: the app's tabs
are dynamic, so while the Compare tab is shown the Explore tab's models are detached, and a
gene picked in the Compare tab updated the Explore tab's Markdown panes (their text follows
the gene) with stylesheets resolved against the CDN. The stylesheet object is shared by
every Markdown pane of the page, so from then on the page asked cdn.holoviz.org for
``markdown.css``. :func:`use_local_resources` points that fallback at this server too.

Panel also drops a document's stylesheet cache when the session's page address is set
(``Location._sync_pathname``, in case the address moved the files). That happened after the
page was built, so every pane's first update sent its stylesheets again as new models and
the browser laid the whole page out again: 0.45-0.55 s instead of 0.07-0.14 s for the first
gene click on the sample. :func:`keep_stylesheets` sets the address before the page is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import panel as pn
    from bokeh.document import Document

#: the template variable in which Panel looks up where its stylesheets live
_DIST_URL = "dist_url"


def use_local_resources(doc: Document | None) -> None:
    """Make Bokeh serve its own files and ``doc``'s components load theirs from this server.

    Call at the start of a session's page build, before any component is rendered.
    ``doc`` is the session's document (None outside a server session: then only the
    process-wide mode is set).
    """
    import panel as pn
    import panel.reactive
    from bokeh.settings import settings
    from panel.io.resources import LOCAL_DIST

    if settings.resources(default="server") != "server":
        settings.resources.set_value("server")
    if doc is None or doc.session_context is None:
        return
    # the stylesheets of a model outside any document (a hidden tab's): Panel's fallback is its
    # CDN (``Syncable._get_properties`` / ``_update_model``, the only two readers of this name);
    # a served page's files are on this server (relative, as Panel's own local address)
    panel.reactive.CDN_DIST = LOCAL_DIST
    # Panel's own server sets this when it renders the page's HTML (panel.io.server.
    # server_html_page_for_session); a session built without that step needs it too.
    rel_path = pn.state.rel_path
    doc._template_variables.setdefault(_DIST_URL, f"{rel_path}/{LOCAL_DIST}" if rel_path else LOCAL_DIST)


def keep_stylesheets(doc: Document | None) -> None:
    """Settle the session's page address before any component is rendered (see above).

    Panel makes a session's ``Location`` (the page's address) on first use. Made from the
    request, it points the document's stylesheets at where the address says they are and
    drops the stylesheet cache. Made here, before the page, that happens while the cache is
    still empty; the browser later reports the same address, and nothing is dropped. Made
    after the page was built (as Panel does otherwise), every pane's first update sent its
    stylesheets again. Call after :func:`use_local_resources`.
    """
    from panel.io.state import state

    if doc is not None and doc.session_context is not None:
        state.location  # noqa: B018 - made on first use, and that is what is wanted here


def divider() -> pn.Spacer:
    """A horizontal rule like ``pn.layout.Divider()``, with no stylesheet to fetch."""
    import panel as pn

    return pn.Spacer(height=1, sizing_mode="stretch_width", margin=(12, 5), styles={"background": "#e0e0e0"})
