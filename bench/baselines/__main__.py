"""Serve one baseline layout: ``python -m bench.baselines --layout main-style --port 8001``."""

from __future__ import annotations

import argparse

import uvicorn

from bench.baselines.asyncio_engine import AsyncioEngine
from bench.baselines.image_loading import ImageLoader
from bench.baselines.main_style import MainStylePreparer
from bench.baselines.openai_app import create_app
from bench.baselines.pr_style import PrStylePreparer
from engine.model_loader import load_model
from engine.tiny_model import ensure_tiny_model
from server.config import ServerConfig

LAYOUTS = ("main-style", "pr-style")


def preparer_class(layout: str) -> type[MainStylePreparer]:
    """The preparer that gives ``layout`` its concurrency layout."""
    return PrStylePreparer if layout == "pr-style" else MainStylePreparer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", choices=LAYOUTS, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default=None, help="model directory (default: vlserve's built-in tiny model)")
    args = parser.parse_args()
    config = ServerConfig(model=args.model)  # vlserve's defaults: same engine limits
    loaded = load_model(
        args.model or ensure_tiny_model(),
        dtype=config.engine.dtype,
        device=config.engine.device,
        max_model_len=config.engine.max_model_len,
    )
    engine = AsyncioEngine.for_model(
        loaded, max_num_seqs=config.engine.max_num_seqs, max_num_batched_tokens=config.engine.max_num_batched_tokens
    )
    preparer = preparer_class(args.layout)(loaded, ImageLoader(config.media))
    app = create_app(engine, preparer, config.model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
