"""LMDeploy-style baseline servers on the same engine and image code as vlserve.

``main-style`` is the layout of LMDeploy's ``main`` branch, ``pr-style`` that of PR #4570
(LMDeploy PR #4570, "use executor + lock for image loading"): FastAPI + uvicorn, an asyncio engine step loop over the
same synchronous ``Scheduler`` + ``EngineCore`` that vlserve uses, and the same
``decode_image``, ``ImagePreprocessor`` and vision tower. Only the concurrency layout
differs, which is what the benchmark compares.

    python -m bench.baselines --layout main-style --host 127.0.0.1 --port 8001
"""
