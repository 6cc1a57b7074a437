"""The HTTP routes, one module per endpoint family."""

from __future__ import annotations

from quart import Quart

from server.routes import chat, completions, health, metrics, models, openapi, tokenize


def register_routes(app: Quart) -> None:
    for module in (health, metrics, models, chat, completions, tokenize, openapi):
        app.register_blueprint(module.blueprint)
