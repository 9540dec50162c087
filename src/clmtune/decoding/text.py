"""Text in and out of decoding: the stop tokens of a model, prompt encoding with truncation, and the cleaning of
generated ids into text, also while streaming (``CleanStreamer``), so every stage's output is decoded alike.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from clmtune.errors import ClmtuneError
from clmtune.tasks.encoding import cut_prompt, leading_special_ids, token_ids
from clmtune.text import clean_text

log = logging.getLogger("clmtune")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a continuation: the tokenizer's and the model's end-of-sequence ids, and the pad id
    (a model never writes real text after padding; the tutorial stopped at ``[PAD]``). A BERT-vocabulary
    tokenizer without an end token ends text with ``[SEP]``."""
    ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    if tokenizer.eos_token_id is None:
        ids.append(getattr(tokenizer, "sep_token_id", None))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    return sorted({i for i in ids if i is not None})


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int | None, truncate: bool = True,
                   ) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each prompt (with the tokenizer's BOS when it uses one) and whether it was cut.

    A prompt longer than ``max_prompt_tokens`` keeps its last tokens (and its BOS): the end of the prompt is what
    the continuation follows. ``truncate=False`` makes that an error.
    """
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ClmtuneError(f"prompt #{i + 1} is empty; give some text to continue")
    prefix = leading_special_ids(tokenizer)
    out, cut = [], []
    for i, ids in enumerate(token_ids(tokenizer, prompts)):
        ids = prefix + ids
        over = max_prompt_tokens is not None and len(ids) > max_prompt_tokens
        if over:
            if not truncate:
                raise ClmtuneError(f"prompt #{i + 1} has {len(ids)} tokens but only {max_prompt_tokens} fit (model "
                                   "context minus --max-new-tokens); shorten it, lower --max-new-tokens, or drop "
                                   "--no-truncate to keep its end")
            log.warning("prompt #%d has %d tokens; kept its last %d to fit the model's context minus "
                        "max_new_tokens (--no-truncate makes this an error)", i + 1, len(ids), max_prompt_tokens)
            ids = cut_prompt(ids, max_prompt_tokens, "left", len(prefix))
        out.append(ids)
        cut.append(over)
    return out, cut


def finish_text(text: str, stops: Sequence[str]) -> str:
    """Cleaned text, cut before the first stop string."""
    text = clean_text(text)
    ends = [text.find(s) for s in stops if s in text]
    return text[:min(ends)].rstrip() if ends else text


def raw_text(tokenizer, ids: list[int]) -> str:
    """Decoded new tokens without special tokens. A continuation may start inside a word: WordPiece then writes
    ``##piece``, which only makes sense glued to the prompt, so the ``##`` goes."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if ids and text.startswith("##") and str(tokenizer.convert_ids_to_tokens(ids[0])).startswith("##"):
        text = text[2:]
    return text


def decode(tokenizer, row: list[int], stop_ids: list[int], stops: Sequence[str]) -> str:
    cut = [row.index(i) for i in stop_ids if i in row]
    row = row[:min(cut)] if cut else row
    return finish_text(raw_text(tokenizer, row), stops)


def stops_in(tokenizer, ids: list[int], stops: Sequence[str]) -> bool:
    """Whether the cleaned text of ``ids`` contains a stop string.

    The decoded, cleaned text is matched rather than vocabulary strings (what ``generate(stop_strings=...)`` does):
    for a BERT character tokenizer (``##`` pieces, spaces between characters) those are not the text the user sees.
    Hidden cost: the row's new tokens are decoded again at every step, O(new_tokens^2) characters per row;
    negligible next to a forward pass for a few hundred tokens.
    """
    return bool(stops) and any(s in clean_text(tokenizer.decode(ids, skip_special_tokens=True)) for s in stops)


class CleanStreamer:
    """Writes the continuation of one row as it is produced (``add`` each new token, ``close`` at the end), cleaned
    exactly like the final text (so the streamed text equals what ``decode`` returns).

    Text is written only once it cannot change: trailing whitespace (removed if a CJK character follows), an
    incomplete UTF-8 character (U+FFFD from a partial byte-level BPE token), and a tail that may begin a stop
    string are held back until the next token or the end.
    Hidden cost: decodes all new tokens at every step (O(n^2) characters); fine for hundreds of tokens.
    """

    def __init__(self, tokenizer, write: Callable[[str], object], stops: Sequence[str],
                 flush: Callable[[], object] | None = None):
        self.tokenizer, self.write, self.stops, self.flush = tokenizer, write, list(stops), flush
        self.ids: list[int] = []
        self.printed = ""

    def add(self, token: int) -> None:
        """The next token of the row (never an end token: the row ends before it)."""
        self.ids.append(token)
        self._emit(final=False)

    def close(self) -> None:
        """The row ended: what was held back goes out."""
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = clean_text(raw_text(self.tokenizer, self.ids), strip=False).lstrip()
        ends = [text.find(s) for s in self.stops if s in text]
        if ends:
            text, final = text[:min(ends)], True
        if final:
            safe = text.rstrip()
        else:
            hold = len(text) - len(text.rstrip())
            if "\ufffd" in text[-4:]:
                hold = max(hold, len(text) - text.rindex("\ufffd", len(text) - 4))
            for s in self.stops:
                for n in range(len(s) - 1, 0, -1):
                    if text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            safe = text[:len(text) - hold]
        # A later token can in principle rewrite earlier text (tokenizer clean-up of " ,"); then wait for more.
        if safe.startswith(self.printed) and len(safe) > len(self.printed):
            self.write(safe[len(self.printed):])
            self.printed = safe
            if self.flush:
                self.flush()
