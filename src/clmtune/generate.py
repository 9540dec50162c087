"""Generate stage: continue prompts with ``transformers``' ``generate`` (KV cache on), cleanly decoded.

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

import torch

from clmtune.config import GenerateConfig, ModelConfig
from clmtune.data import read_table
from clmtune.tasks.encoding import collate, cut_prompt, leading_special_ids, token_ids
from clmtune.errors import ClmtuneError
from clmtune.inference import for_inference
from clmtune.models import (check_tokenizer_fits, context_length, load_model, load_tokenizer, model_device,
                            resolve_device)
from clmtune.run import RunDir
from clmtune.text import clean_text

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


def _stopping_criteria(tokenizer, stops: Sequence[str], start: int):
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


def _generation_config(settings: GenerateConfig, stop_ids: list[int], pad_id: int):
    from transformers import GenerationConfig

    sample = settings.temperature > 0
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=sample,
        temperature=settings.temperature if sample else None,
        top_k=(settings.top_k or None) if sample else None, top_p=settings.top_p if sample else None,
        repetition_penalty=settings.repetition_penalty, num_return_sequences=settings.num_return_sequences,
        eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True)


def _raw_text(tokenizer, ids: list[int]) -> str:
    """Decoded new tokens without special tokens. A continuation may start inside a word: WordPiece then writes
    ``##piece``, which only makes sense glued to the prompt, so the ``##`` goes."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if ids and text.startswith("##") and str(tokenizer.convert_ids_to_tokens(ids[0])).startswith("##"):
        text = text[2:]
    return text


def _decode(tokenizer, row: list[int], stop_ids: list[int], stops: Sequence[str]) -> str:
    cut = [row.index(i) for i in stop_ids if i in row]
    row = row[:min(cut)] if cut else row
    return finish_text(_raw_text(tokenizer, row), stops)


def _prepare(model, tokenizer, prompts: Sequence[str], settings: GenerateConfig):
    if settings.temperature == 0 and settings.num_return_sequences > 1:
        raise ClmtuneError(f"num_return_sequences={settings.num_return_sequences} needs sampling; greedy decoding "
                           "(temperature 0) gives one continuation. Set a temperature > 0")
    ctx = context_length(model)
    room = None if ctx is None else ctx - settings.max_new_tokens
    if room is not None and room < 1:
        raise ClmtuneError(f"max_new_tokens={settings.max_new_tokens} leaves no room for the prompt in the model's "
                           f"context of {ctx} tokens; lower it below {ctx}")
    ids, cut = encode_prompts(tokenizer, prompts, room, settings.truncate)
    return ids, cut, stop_token_ids(tokenizer, model)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], settings: GenerateConfig, progress: bool = False,
             ) -> list[Generation]:
    """``num_return_sequences`` continuations of each prompt (the prompt itself not included), in prompt order.

    Prompts are grouped ``settings.batch_size`` at a time, longest first, so rows of similar length share a batch
    (less padding); ``settings.seed`` seeds sampling once, so the same call gives the same output.
    """
    from tqdm.auto import tqdm

    ids, cut, stop_ids = _prepare(model, tokenizer, prompts, settings)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    gen_cfg = _generation_config(settings, stop_ids, tokenizer.pad_token_id)
    k = settings.num_return_sequences
    outputs: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(settings.seed)
    groups = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    for group in tqdm(groups, desc="generate", disable=not progress or len(groups) < 2, unit="batch"):
        batch = collate([{"input_ids": ids[i]} for i in group], tokenizer.pad_token_id)  # left-padded (B, T)
        input_ids = batch["input_ids"].to(model_device(model))
        attention_mask = batch["attention_mask"].to(input_ids.device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg,
                             stopping_criteria=_stopping_criteria(tokenizer, settings.stop, input_ids.shape[1]))
        new = out[:, input_ids.shape[1]:].tolist()  # (B * k, new tokens); row r is prompt group[r // k]
        for r, row in enumerate(new):
            outputs[group[r // k]].append(_decode(tokenizer, row, stop_ids, settings.stop))
    return [Generation(prompt=p, outputs=o, prompt_tokens=len(x), truncated=c)
            for p, o, x, c in zip(prompts, outputs, ids, cut)]


def generate_texts(model, tokenizer, prompts: list[str], settings: GenerateConfig) -> list[list[str]]:
    """For each prompt, its ``num_return_sequences`` continuations."""
    return [g.outputs for g in generate(model, tokenizer, prompts, settings)]


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
        text = clean_text(_raw_text(self.tokenizer, self.ids), strip=False).lstrip()
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


@torch.no_grad()
def stream(model, tokenizer, prompt: str, settings: GenerateConfig,
           write: Callable[[str], object] | None = None) -> Generation:
    """Generate one continuation of one prompt, writing text as tokens arrive (to stdout unless ``write`` is given)
    and a newline at the end; returns the same as ``generate``."""
    if settings.num_return_sequences != 1:
        raise ClmtuneError("--stream prints one continuation; drop --num-return-sequences or --stream")
    ids, cut, stop_ids = _prepare(model, tokenizer, [prompt], settings)
    input_ids = torch.tensor(ids, device=model_device(model))  # (1, T)
    streamer = CleanStreamer(tokenizer, write or sys.stdout.write, stop_ids, settings.stop,
                             flush=None if write else sys.stdout.flush)
    torch.manual_seed(settings.seed)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         generation_config=_generation_config(settings, stop_ids, tokenizer.pad_token_id),
                         stopping_criteria=_stopping_criteria(tokenizer, settings.stop, input_ids.shape[1]),
                         streamer=streamer)
    text = _decode(tokenizer, out[0, input_ids.shape[1]:].tolist(), stop_ids, settings.stop)
    return Generation(prompt=prompt, outputs=[text], prompt_tokens=len(ids[0]), truncated=cut[0])


def read_prompts_file(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a text file (one per line; blank lines are skipped and counted) or a CSV/TSV/JSONL column."""
    path = Path(path)
    if not path.is_file():
        raise ClmtuneError(f"--prompts-file {str(path)!r}: no such file")
    if column is None:
        if path.suffix.lower() in (".csv", ".tsv", ".json", ".jsonl", ".parquet"):
            raise ClmtuneError(f"--prompts-file {path} is a table; name the prompt column with --column")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ClmtuneError(f"{path} is not UTF-8 (byte offset {exc.start}); convert it, e.g. "
                               "`iconv -f gbk -t utf-8`") from None
        prompts = [line for line in lines if line.strip()]
        if len(prompts) < len(lines):
            log.info("%s: %d prompts, %d blank lines skipped", path, len(prompts), len(lines) - len(prompts))
    else:
        rows = read_table(path)
        if rows and column not in rows[0]:
            raise ClmtuneError(f"--column {column!r} is not a column of {path} (columns: {list(rows[0])})")
        prompts = ["" if v is None else str(v) for v in (r[column] for r in rows)]
        empty = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty:
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
