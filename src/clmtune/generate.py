"""Generate stage: continue prompts through the one decoding loop (``clmtune.decoding``: KV cache on, cleanly
decoded).

Prompts are left-padded into batches (the decoder-only convention: every row's last position is real text, so the
next token of every row is predicted at the same position). Output text never contains special tokens
(``[PAD]``/``[SEP]``/``[CLS]``, ``</s>``), and the spaces a BERT character tokenizer puts between Chinese
characters are removed (``游 泳 池`` -> ``游泳池``).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from clmtune.config import GenerateConfig
from clmtune.data.readers import READERS, ReadOptions, find_reader
from clmtune.decoding import Decoder, Row, Sampling, encode_prompts, load_for_generation  # noqa: F401
from clmtune.errors import ClmtuneError
from clmtune.models import context_length

log = logging.getLogger("clmtune")


@dataclass
class Generation:
    """The continuations of one prompt."""

    prompt: str
    outputs: list[str]
    prompt_tokens: int
    """Tokens of the prompt that the model saw (after truncation)."""
    truncated: bool = False
    """The prompt was cut on the left to fit the model's context."""


def _prepare(model, tokenizer, prompts: Sequence[str], settings: GenerateConfig):
    if settings.temperature == 0 and settings.num_return_sequences > 1:
        raise ClmtuneError(f"num_return_sequences={settings.num_return_sequences} needs sampling; greedy decoding "
                           "(temperature 0) gives one continuation. Set a temperature > 0")
    ctx = context_length(model)
    room = None if ctx is None else ctx - settings.max_new_tokens
    if room is not None and room < 1:
        raise ClmtuneError(f"max_new_tokens={settings.max_new_tokens} leaves no room for the prompt in the model's "
                           f"context of {ctx} tokens; lower it below {ctx}")
    return encode_prompts(tokenizer, prompts, room, settings.truncate)


def generate(model, tokenizer, prompts: Sequence[str], settings: GenerateConfig, progress: bool = False,
             ) -> list[Generation]:
    """``num_return_sequences`` continuations of each prompt (the prompt itself not included), in prompt order.

    Prompts are grouped ``settings.batch_size`` at a time, longest first, so rows of similar length share a batch
    (less padding). Continuation j of every prompt is sampled with its own generator seeded from
    ``settings.seed`` and j, so a prompt's text does not depend on the other prompts or the batch size.
    """
    ids, cut = _prepare(model, tokenizer, prompts, settings)
    outputs = Decoder(model, tokenizer).texts(ids, Sampling.of(settings), settings.num_return_sequences,
                                              settings.batch_size, progress)
    return [Generation(prompt=p, outputs=o, prompt_tokens=len(x), truncated=c)
            for p, o, x, c in zip(prompts, outputs, ids, cut)]


def stream(model, tokenizer, prompt: str, settings: GenerateConfig,
           write: Callable[[str], object] | None = None) -> Generation:
    """Generate one continuation of one prompt, writing text as tokens arrive (to stdout unless ``write`` is given)
    and a newline at the end; returns the same as ``generate``."""
    if settings.num_return_sequences != 1:
        raise ClmtuneError("--stream prints one continuation; drop --num-return-sequences or --stream")
    ids, cut = _prepare(model, tokenizer, [prompt], settings)
    out = write or sys.stdout.write

    def on_text(row, text: str) -> None:
        out(text)
        if write is None:
            sys.stdout.flush()

    decoder = Decoder(model, tokenizer)
    row = Row(decoder, ids[0], Sampling.of(settings), on_text=on_text)
    decoder.run([row])
    out("\n")
    return Generation(prompt=prompt, outputs=[row.text], prompt_tokens=len(ids[0]), truncated=cut[0])


def read_prompts_file(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a file any data reader reads (``clmtune.data.readers``): a text file gives one prompt per line
    (blank lines skipped and counted), a table the ``column`` named. A file no reader claims is read as text."""
    path = Path(path)
    if not path.is_file():
        raise ClmtuneError(f"--prompts-file {str(path)!r}: no such file")
    reader = find_reader(path) or READERS["text"]
    column = column or reader.text_column
    if column is None:
        raise ClmtuneError(f"--prompts-file {path} is a table; name the prompt column with --column")
    rows = reader.read(path, ReadOptions(sample_by="line", encoding_key=None))
    if rows and column not in rows[0]:
        raise ClmtuneError(f"--column {column!r} is not a column of {path} (columns: {list(rows[0])})")
    prompts = ["" if v is None else str(v) for v in (r[column] for r in rows)]
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if reader.text_column == column:  # lines of text: a blank line separates prompts
        prompts = [p for p in prompts if p.strip()]
        if empty:
            log.info("%s: %d prompts, %d blank lines skipped", path, len(prompts), len(empty))
    elif empty:
        raise ClmtuneError(f"{path} row {empty[0] + 2}: column {column!r} is empty ({len(empty)} empty rows); "
                           "fill or remove them")
    if not prompts:
        raise ClmtuneError(f"{path} holds no prompts")
    return prompts


def write_jsonl(results: Sequence[Generation], path: str | Path) -> Path:
    """One JSON object per prompt: ``{"prompt", "outputs", "prompt_tokens", "truncated"}`` (UTF-8, not escaped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for g in results:
            fh.write(json.dumps(asdict(g), ensure_ascii=False) + "\n")
    return path
