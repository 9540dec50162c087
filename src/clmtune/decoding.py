"""Decoding pieces every stage that writes text shares (a foundation): loading a model for inference, the stop
tokens and stop strings, the ``GenerationConfig`` of a ``GenerateConfig``, prompt encoding with truncation, and
the cleaning of generated ids into text (also while streaming). ``generate``, ``chat`` and ``serve`` use them, so
their outputs are decoded alike; they live below the stages because a stage may not import another one.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from clmtune.config import GenerateConfig, ModelConfig
from clmtune.models import resolve_device
from clmtune.errors import ClmtuneError
from clmtune.inference import for_inference
from clmtune.models import check_tokenizer_fits, load_model, load_tokenizer
from clmtune.run import RunDir
from clmtune.tasks.encoding import cut_prompt, leading_special_ids, token_ids
from clmtune.text import clean_text

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


def stopping_criteria(tokenizer, stops: Sequence[str], start: int):
    """Stop a row once its decoded, cleaned continuation contains a stop string.

    Hand-written: ``generate(stop_strings=...)`` matches raw vocabulary strings, which for a BERT character
    tokenizer (``##`` pieces, spaces inserted between characters) is not the text the user sees.
    Hidden cost: every step decodes each row's new tokens again, O(new_tokens^2) characters per row; negligible
    next to a forward pass for a few hundred tokens.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            rows = input_ids[:, start:].tolist()
            hit = [any(s in clean_text(tokenizer.decode(r, skip_special_tokens=True)) for s in stops) for r in rows]
            return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnStrings()]) if stops else None


def generation_config(settings: GenerateConfig, stop_ids: list[int], pad_id: int):
    from transformers import GenerationConfig

    sample = settings.temperature > 0
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=sample,
        temperature=settings.temperature if sample else None,
        top_k=(settings.top_k or None) if sample else None, top_p=settings.top_p if sample else None,
        repetition_penalty=settings.repetition_penalty, num_return_sequences=settings.num_return_sequences,
        eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True)


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


class CleanStreamer:
    """A ``generate`` streamer that writes the continuation of one prompt as it is produced, cleaned exactly like
    the final text (so the streamed text equals what ``generate`` returns).

    Text is written only once it cannot change: trailing whitespace (removed if a CJK character follows), an
    incomplete UTF-8 character (U+FFFD from a partial byte-level BPE token), and a tail that may begin a stop
    string are held back until the next token or the end.
    Hidden cost: decodes all new tokens at every step (O(n^2) characters); fine for hundreds of tokens.
    """

    def __init__(self, tokenizer, write: Callable[[str], object], stop_ids: Sequence[int], stops: Sequence[str],
                 flush: Callable[[], object] | None = None):
        self.tokenizer, self.write, self.stop_ids, self.stops = tokenizer, write, set(stop_ids), list(stops)
        self.flush = flush
        self.ids: list[int] = []
        self.printed = ""
        self.seen_prompt = False
        self.done = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate first hands over the prompt ids (1, T)
            self.seen_prompt = True
            return
        for t in value.reshape(-1).tolist():  # (1,) per step for one prompt
            if self.done or t in self.stop_ids:
                self.done = True
                break
            self.ids.append(t)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)
        self.write("\n")

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
