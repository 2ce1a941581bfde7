"""The operator's web UI, served by the daemon at ``/`` next to the JSON API.

Server-rendered pages (Jinja2, ``loopd.ui.views``; handlers in ``loopd.ui.pages``),
readable without JavaScript; htmx (a committed static file) for the buttons, and a few
lines of our own JavaScript for the live stream (``loopd.ui.live``). Every page passes
the API's gate (``loopd.api.auth``): with tokens configured, a browser signs in at
``/signin`` and carries a session cookie; the buttons post to the API's own routes with
the page's CSRF header, so roles and the audit trail are the API's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from loopd.api.auth import Gate
from loopd.ui.live import STOPPING, Live
from loopd.ui.pages import Pages

STATIC = Path(__file__).parent / "static"


def add_routes(app: web.Application, gate: Gate) -> None:
    """Mount the UI's pages, its static files and its live stream on the API's app."""
    pages = Pages(gate)
    live = Live(pages)
    app[STOPPING] = asyncio.Event()

    async def stop_streams(app: web.Application) -> None:
        app[STOPPING].set()

    app.on_shutdown.append(stop_streams)
    add = app.router.add_get
    add("/", pages.incidents, name="ui_incidents")
    add("/runs/{id:.+}", pages.run, name="ui_run")
    add("/decisions", pages.decisions, name="ui_decisions")
    add("/approvals", pages.approvals, name="ui_approvals")
    add("/rules", pages.rules, name="ui_rules")
    add("/guards", pages.guards, name="ui_guards")
    add("/sources", pages.sources, name="ui_sources")
    add("/live", live.stream, name="ui_live")
    add("/signin", pages.signin, name="ui_signin")
    app.router.add_post("/signin", pages.signin_post, name="ui_signin_post")
    app.router.add_post("/signout", pages.signout, name="ui_signout")
    app.router.add_static("/static/", STATIC, name="ui_static")

