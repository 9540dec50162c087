"""UI stage: ``clmtune ui`` -- fine-tune from the browser in one local page: data (pick or upload a file, see what
``clmtune prepare`` says), settings (the YAML, shown and downloadable), training (a background ``clmtune train``
with live curves, stop, resume, a queue), runs (status, comparison, evaluation, export) and the playground of any
finished run. Needs the ``serve`` extra (FastAPI + uvicorn).

One truth: the page writes a YAML and runs the same ``clmtune`` commands a person would type (``jobs``), in the
workspace folder; a run started in the browser is a CLI run.

- ``workspace``: the folder the page may touch; every path a request names is checked against it.
- ``jobs``: the queue of ``clmtune`` child processes (one at a time), their logs, stop (SIGINT, as Ctrl-C).
- ``playground``: a ``clmtune serve`` child for the finished run being tried, reached through the ui server.
- ``app``: the FastAPI app (token, limits, errors); ``routers``: its routes by group (page, data, jobs, runs,
  playground), which reach the workspace, jobs and playground through ``common.Ui``; ``settings``: the form and the
  YAML; the page is ``static/`` (no CDN, everything served locally).
"""

from __future__ import annotations

from clmtune.errors import ClmtuneError


def serve_ui(*args, **kwargs):
    """``clmtune.ui.app.serve_ui``, with a clear error when the ``serve`` extra is not installed."""
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ClmtuneError(f"clmtune ui needs FastAPI, uvicorn and httpx ({exc.name} is missing): "
                           "pip install 'clmtune[serve]'") from None
    from clmtune.ui.app import serve_ui as run

    return run(*args, **kwargs)
