"""The model side of vlserve: loading, continuous batching, sampling, detokenization.

Modules, from the caller's side down:

- ``interface``: the ``Engine`` protocol the server uses; ``config``: ``EngineConfig``;
  ``errors``: ``ModelLoadError``, ``RequestRejected``.
- ``async_engine``: ``AsyncEngine``, the front end on the event loop (``open_stream``,
  aborts, health, statistics) and ``open_engine``; with ``stream_registry``,
  ``request_stream`` (deltas to one consumer) and ``outbox`` (adds and aborts to send).
- ``thread_core`` / ``worker_core`` + ``worker_main``: where the step loop runs (a thread
  under the device gate, or the engine worker process); ``core_messages`` and ``wire``:
  what they exchange and its framing.
- ``step_loop``: the one synchronous step loop; ``scheduler``, ``sequence``,
  ``engine_core`` (one step), ``model_runner``, ``block_manager``, ``paged_kv_cache``, ``model_adapter``,
  ``sampler``, ``detokenizer``, ``statistics``.
- ``model_loader``, ``tiny_model``: loading a model directory; the built-in test model.
"""
