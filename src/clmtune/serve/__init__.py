"""Serve stage: ``clmtune serve`` -- an OpenAI-compatible HTTP server and a browser playground for a trained run
or a model folder. Needs the ``serve`` extra (``pip install 'clmtune[serve]'``: FastAPI + uvicorn).

- ``engine``: the model, loaded once; batched decoding with a ``torch.Generator`` per request; classification.
- ``batcher``: an asyncio queue that groups requests arriving together and runs them off the event loop.
- ``schemas``: request/response bodies in OpenAI's shapes.
- ``app``: the FastAPI routes, limits, errors and API key.
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
