"""The server's routes, one ``APIRouter`` per endpoint group: ``models`` (``/health``, ``/v1/models``),
``completions``, ``chat`` (chat completions), ``classify`` and ``playground`` (the page at ``/``). The ``/v1``
routes need the API key when the server has one (the ``state.authorized`` dependency)."""
