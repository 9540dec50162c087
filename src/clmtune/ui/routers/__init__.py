"""The ui's routes, one ``APIRouter`` per group: ``page`` (the page, its files, what it may offer), ``data``
(files, uploads, previews, ``prepare``, settings -> YAML), ``jobs`` (train, resume, evaluate, export; the queue),
``runs`` (the runs, their live events, pictures, comparison) and ``playground`` (a finished run's ``clmtune serve``
reached through the ui server)."""
