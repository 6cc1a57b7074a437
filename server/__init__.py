"""The HTTP side of vlserve: quart-trio app, OpenAI schemas, routes, SSE, errors, auth, CLI."""
