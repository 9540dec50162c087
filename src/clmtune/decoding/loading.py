"""A model and its tokenizer loaded for decoding: from a run folder or a model, on a device, in a precision."""

from __future__ import annotations

import logging

from clmtune.config import ModelConfig
from clmtune.errors import ClmtuneError
from clmtune.inference import for_inference
from clmtune.models import check_tokenizer_fits, load_model, load_tokenizer, resolve_device
from clmtune.run import RunDir

log = logging.getLogger("clmtune")


def load_for_generation(run: str | None = None, model: str | None = None, device: str = "auto",
                        dtype: str = "fp32"):
    """(model, tokenizer) from a run folder (base + adapter) or a plain/merged model folder, hub id or builtin name,
    on ``device`` (``auto``: the GPU when there is one), in ``dtype`` (``auto``/``fp32``/``bf16``, see
    ``clmtune.inference.for_inference``; the CLI passes ``generate.dtype``, whose default is ``auto``).

    ``model`` may also name a run folder (adapter or full fine-tuning, see ``RunDir.is_run``).
    """
    if (run is None) == (model is None):
        raise ClmtuneError("give exactly one of --run RUN_DIR or --model MODEL")
    if model is not None and RunDir(model).config_file.is_file():  # a run folder, finished or not (then: why)
        run, model = model, None
    dev = resolve_device(device)
    if run is not None:
        m, tok = RunDir(run).load_model(device=dev)
    else:
        cfg = ModelConfig(name_or_path=model)
        m = load_model(cfg).eval().to(dev)
        tok = load_tokenizer(cfg)
        check_tokenizer_fits(m, tok, model)
    m, precision, why = for_inference(m, dtype)
    log.info("generation in %s (%s)", precision, why)
    return m, tok

