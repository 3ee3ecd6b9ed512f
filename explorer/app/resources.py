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
    from bokeh.settings import settings
    from panel.io.resources import LOCAL_DIST

    if settings.resources(default="server") != "server":
        settings.resources.set_value("server")
    if doc is None or doc.session_context is None:
        return
    # Panel's own server sets this when it renders the page's HTML (panel.io.server.
    # server_html_page_for_session); a session built without that step needs it too.
    rel_path = pn.state.rel_path
    doc._template_variables.setdefault(_DIST_URL, f"{rel_path}/{LOCAL_DIST}" if rel_path else LOCAL_DIST)


def divider() -> pn.Spacer:
    """A horizontal rule like ``pn.layout.Divider()``, with no stylesheet to fetch."""
    import panel as pn

    return pn.Spacer(height=1, sizing_mode="stretch_width", margin=(12, 5), styles={"background": "#e0e0e0"})
