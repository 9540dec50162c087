"""Serve stage: ``clmtune serve`` -- an OpenAI-compatible HTTP server and a browser playground for a trained run
or a model folder. Needs the ``serve`` extra (``pip install 'clmtune[serve]'``: FastAPI + uvicorn).

- ``engine``: the model, loaded once; batched decoding with a ``torch.Generator`` per request; classification.
- ``batcher``: an asyncio queue that groups requests arriving together and runs them off the event loop.
- ``schemas``: request/response bodies in OpenAI's shapes.
- ``app``: the FastAPI app (``create_app``) and ``serve``; ``routers``: its routes by endpoint group (models and
  health, completions, chat, classify, playground); ``state``: limits, the API-key dependency and what routes
  share; ``http``: error objects, the body limit; ``events``: waiting for a job's rows, or streaming them.
"""

from __future__ import annotations

from clmtune.errors import ClmtuneError


def serve(*args, **kwargs):
    """``clmtune.serve.app.serve``, with a clear error when the ``serve`` extra is not installed."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ClmtuneError(f"clmtune serve needs FastAPI and uvicorn ({exc.name} is missing): "
                           "pip install 'clmtune[serve]'") from None
    from clmtune.serve.app import serve as run

    return run(*args, **kwargs)


def __getattr__(name: str):
    """``from clmtune.serve import create_app, Limits``: imported on first use (FastAPI is an optional extra)."""
    if name in ("create_app", "Limits"):
        from clmtune.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
