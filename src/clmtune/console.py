"""What the user's terminal shows (a foundation): clmtune's own log lines and progress bars, not the libraries'
loading bars and deprecation chatter. Used by the CLI and the scripts (``scripts/demo.py``), so both look the same.
"""

from __future__ import annotations

import logging
import warnings

LIBRARIES = r"(transformers|peft|accelerate|datasets|torch|huggingface_hub|trl)(\.|$)"


def setup_console(debug: bool = False) -> None:
    """``clmtune: ...`` log lines (DEBUG with ``debug``); library FutureWarnings/DeprecationWarnings hidden unless
    ``debug`` (they are about the libraries' own upgrades, nothing the user can act on: e.g. transformers'
    ``is_gradient_checkpointing`` FutureWarning, raised inside peft on every LoRA run)."""
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="clmtune: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()  # our own bars stay; the per-file loading bars go
    if debug:
        hf_logging.set_verbosity_warning()
        warnings.simplefilter("default")
        return
    hf_logging.set_verbosity_error()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
