"""The model behind the server: loaded once, used by one worker thread, batched generation and classification.

Generation is a hand-written decode loop over ``transformers``' KV cache (``DynamicCache``) instead of
``model.generate``: ``generate`` samples with the process-wide RNG, so two requests in one batch could not each
have their own seed, and reseeding it per call (what ``clmtune generate`` does) is not safe when requests overlap.
Here every row (one choice of one request) owns a ``torch.Generator``; rows join the running batch before any
decode step (their prompts are prefilled, and their KV cache is left-padded and concatenated to the batch's),
leave it as soon as they finish or their client goes away (``Cache.batch_select_indices``), and each row's text
goes out as it grows (the same ``CleanStreamer`` as ``clmtune generate --stream``, so streamed text equals the
final text).

Batched and unbatched forwards are not bitwise equal (other matmul shapes, padding): logits differ by float
rounding (~3e-6 on gpt2-zh-small), which changes a sampled token only when the row's uniform draw falls that
close to a boundary of the cumulative distribution; sampling in float64 (``_pick``) keeps that near 1e-6 per
token. Tests check that seeded rows give exactly their one-at-a-time tokens, batched and joining mid-flight, on
the tiny model and on the shipped gpt2-zh-small; bench/bench_serve.py checks the texts of both servers are equal.
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from clmtune.errors import ClmtuneError
from clmtune.decoding import CleanStreamer, finish_text, load_for_generation, stop_token_ids
from clmtune.decoding import decode, raw_text  # the exact decoding `clmtune generate` applies
from clmtune.models import cache_kwarg, context_length, is_prompt_learning, model_device, output_cache, resolve_device
from clmtune.run import RunDir
from clmtune.tasks import Task, get_task
from clmtune.tasks.encoding import leading_special_ids, left_pad
from clmtune.tasks.examples import is_blank
from clmtune.text import clean_text

log = logging.getLogger("clmtune")


class RequestError(ClmtuneError):
    """A request the model cannot serve (too long, no chat template, not a classification run): HTTP 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)
    """Token ids that end this request's rows besides the model's end tokens (a chat template's end marker)."""


def row_seed(seed: int | None, choice: int) -> int:
    """The generator seed of choice ``choice`` of a request: ``seed`` itself for the first choice, a mix of both for
    the others (so choice 1 of seed 5 is not choice 0 of seed 6); fresh entropy without a seed."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
    if choice == 0:
        return seed & 0x7FFF_FFFF_FFFF_FFFF
    return int(np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, choice]).generate_state(1, np.uint64)[0] >> 1)


class Row:
    """One continuation being generated. ``on_text(row, delta)`` gets each piece of final text as it is known;
    ``on_done(row)`` is called once when it ends (``finish_reason`` ``stop``, ``length`` or ``cancelled``)."""

    def __init__(self, engine: "Engine", prompt_ids: list[int], sampling: Sampling, choice: int,
                 on_text: Callable[["Row", str], Any], on_done: Callable[["Row"], Any], tag: Any = None):
        self.prompt_ids, self.sampling, self.choice, self.tag = prompt_ids, sampling, choice, tag
        self.generator = torch.Generator().manual_seed(row_seed(sampling.seed, choice))
        self.new_ids: list[int] = []
        self.finish_reason: str | None = None
        self.text = ""
        self.cancelled = threading.Event()
        self._engine, self._on_done = engine, on_done
        self._stop_ids = sorted(set(engine.stop_ids) | set(sampling.stop_ids))
        self._streamer = CleanStreamer(engine.tokenizer, lambda s: on_text(self, s), self._stop_ids, sampling.stop)
        self._streamer.seen_prompt = True  # we hand it new tokens only

    def push(self, token: int) -> bool:
        """Take the next sampled token; True when the row has ended."""
        if token in self._stop_ids:
            return self._finish("stop")
        self.new_ids.append(token)
        self._streamer.put(torch.tensor([token]))
        if self.sampling.stop:
            text = clean_text(self._engine.tokenizer.decode(self.new_ids, skip_special_tokens=True))
            if any(s in text for s in self.sampling.stop):
                return self._finish("stop")
        if len(self.new_ids) >= self.sampling.max_tokens:
            return self._finish("length")
        return False

    def _finish(self, reason: str) -> bool:
        self.finish_reason = reason
        self._streamer._emit(final=True)  # the held-back tail (trailing space, partial character) goes out now
        self.text = decode(self._engine.tokenizer, self.new_ids, self._stop_ids, self.sampling.stop)
        self._on_done(self)
        return True

    def cancel_now(self) -> None:
        self.finish_reason = "cancelled"
        self.text = finish_text(raw_text(self._engine.tokenizer, self.new_ids), self.sampling.stop)
        self._on_done(self)


def _pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """Next token of one row from its (vocab,) CPU logits: greedy at temperature 0, else nucleus sampling with the
    row's own generator.

    Inverse-CDF draw in float64 (one uniform number from the row's generator; ``torch.multinomial`` costs ~1 ms a
    call here). A batched forward gives logits that differ from the same row alone by float rounding (~3e-6 on
    gpt2-zh-small); a token can then only change when the uniform number falls that close to a boundary of the
    cumulative distribution. In float32 the CDF itself is coarse (7,000 tiny probabilities summed, 6e-8 steps
    at 0.6) and such flips showed up once in ~1,000 tokens; in float64 they are ~1e-6 per token.
    """
    if s.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p >= s.top_p  # tokens after the nucleus; the first one always stays
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    cdf = probs.cumsum(0)
    u = torch.rand((), dtype=torch.float64, generator=generator) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=probs.numel() - 1))


class Engine:
    """A model and tokenizer loaded once. Not thread-safe: only the batcher's worker thread calls ``run`` and
    ``classify``; the event loop calls only the ``encode_*``/``check_fits`` helpers (``request_tokenizer``)."""

    def __init__(self, model, tokenizer, model_id: str, task: Task | None = None, labels: list[str] | None = None,
                 run_cfg=None):
        """``task``: the run's task (``None`` for a plain model); a task with labels makes ``/v1/classify``
        available, with ``labels`` (the run's label set) and ``run_cfg`` (its template and eval settings)."""
        self.model, self.tokenizer, self.model_id = model.eval(), tokenizer, model_id
        # The event loop encodes requests while the worker thread decodes tokens: a Rust tokenizer used from two
        # threads at once can fail ("Already borrowed"), so each side has its own copy.
        self.request_tokenizer = copy.deepcopy(tokenizer)
        self.task, self.run_cfg = task, run_cfg
        self.labels = list(labels or []) if self.classifies else []
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.context = context_length(model)
        self.device = model_device(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        self._takes_positions = "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._cache_kwarg = cache_kwarg(model)  # ``past_key_values`` or ``cache``, as the installed transformers
        if is_prompt_learning(model):
            raise ClmtuneError("serving prompt-learning runs (prefix/prompt/p-tuning) is not supported yet: their "
                               "virtual tokens live outside the KV cache the server decodes with; export a LoRA/IA3/"
                               "full run, or use `clmtune generate`")
        gen = getattr(run_cfg, "generate", None)
        self.default_max_tokens = getattr(gen, "max_new_tokens", 32)

    @property
    def classifies(self) -> bool:
        """The run's task predicts a label of a closed set (``/v1/classify``)."""
        return self.task is not None and self.task.has_labels

    @property
    def chats(self) -> bool:
        """The tokenizer has a chat template, so ``/v1/chat/completions`` can render a conversation."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def task_name(self) -> str:
        return self.task.name if self.task is not None else "lm"

    @classmethod
    def load(cls, run: str | None = None, model: str | None = None, device: str = "auto") -> "Engine":
        """A run folder (adapter or full fine-tuning; ``model`` may name one too) or a plain model."""
        if (run is None) == (model is None):
            raise ClmtuneError("give exactly one of --run RUN_DIR or --model MODEL")
        folder = run if run is not None else (model if RunDir.is_run(model) else None)
        if folder is None:
            m, tok = load_for_generation(None, model, device)
            return cls(m, tok, str(model))
        rd = RunDir(folder)
        rd.check_finished("serve")  # one line saying why an unfinished run cannot be served
        cfg = rd.load_config()
        m, tok = rd.load_model(device=resolve_device(device), cfg=cfg)
        task = get_task(cfg.data.task)
        return cls(m, tok, rd.path.resolve().name, task, rd.labels() if task.has_labels else None, cfg)

    # ---- encoding (event loop side: tokenizer only) ----
    def encode_prompt(self, prompt: str) -> list[int]:
        if not prompt.strip():
            raise RequestError("prompt is empty; give some text to continue", param="prompt")
        tok = self.request_tokenizer
        return leading_special_ids(tok) + tok(prompt, add_special_tokens=False).input_ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        template = getattr(self.tokenizer, "chat_template", None)  # the run's tokenizer says (a string: safe to read)
        if not self.chats:
            raise RequestError(f"model {self.model_id!r} has no chat template (its tokenizer sets no "
                               "chat_template); use /v1/completions, or serve a chat run", param="messages",
                               code="no_chat_template")
        try:
            text = self.request_tokenizer.apply_chat_template(messages, chat_template=template,
                                                              add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # a template may refuse a conversation (e.g. no system role): the request's fault
            raise RequestError(f"the model's chat template rejected these messages: {exc}", param="messages",
                               code="chat_template_error") from None
        return self.request_tokenizer(text, add_special_tokens=False).input_ids

    def chat_stops(self) -> tuple[list[int], list[str]]:
        """What ends an assistant reply under the chat template besides the end token: its end marker as a token
        id, or as text when the vocabulary has no such token (``chat_templates.reply_stops``, as `clmtune chat`)."""
        from clmtune.chat_templates import reply_stops

        template = self.tokenizer.chat_template
        if getattr(self, "_chat_stops", (None,))[0] != template:  # once per template (get_vocab builds a dict)
            self._chat_stops = (template, reply_stops(self.tokenizer))  # read-only use: safe beside the decoder
        return self._chat_stops[1]

    def check_fits(self, ids: list[int], max_tokens: int, max_prompt_tokens: int | None) -> None:
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens; this server takes at most {max_prompt_tokens}",
                               param="prompt", code="context_length_exceeded")
        if self.context is not None and len(ids) + max_tokens > self.context:
            raise RequestError(f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the model's "
                               f"context of {self.context} tokens; shorten the prompt or lower max_tokens",
                               param="max_tokens", code="context_length_exceeded")

    # ---- generation (worker thread) ----
    def _forward(self, input_ids, attention_mask, positions, cache):
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}
        if cache is not None:
            kw[self._cache_kwarg] = cache
        if self._takes_positions:
            kw["position_ids"] = positions
        if self._takes_logits_to_keep:
            kw["logits_to_keep"] = 1  # the LM head only on the last position
        out = self.model(**kw)
        return out.logits[:, -1, :].float().cpu(), output_cache(out)  # (B, vocab)

    def _prefill(self, rows: list[Row]):
        """One forward over the rows' left-padded prompts: (last logits (B, vocab), cache, mask (B, T),
        last positions (B,))."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = left_pad([r.prompt_ids for r in rows], pad).to(self.device)  # (B, T)
        mask = left_pad([[1] * len(r.prompt_ids) for r in rows], 0).to(self.device)  # (B, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row counts from its first real token
        logits, cache = self._forward(ids, mask, positions, None)
        return logits, cache, mask, positions[:, -1]

    @staticmethod
    def _mergeable(cache) -> bool:
        """Caches whose layers are plain growing tensors (no sliding window, no offset bookkeeping) can be padded
        and concatenated along the batch."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))

    @staticmethod
    def _merge(cache, mask, new_cache, new_mask):
        """Rows of ``new_cache`` join ``cache``: the shorter of the two is left-padded (masked out) to the other's
        length, then both are concatenated along the batch. Returns (cache, mask)."""
        length = max(mask.shape[1], new_mask.shape[1])

        def pad(t, dim):  # zeros on the left of ``dim`` up to ``length``
            missing = length - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(cache.layers, new_cache.layers):
            old.keys = torch.cat([pad(old.keys, -2), pad(new.keys, -2)], dim=0)  # (B + b, heads, length, dim)
            old.values = torch.cat([pad(old.values, -2), pad(new.values, -2)], dim=0)
        return cache, torch.cat([pad(mask, 1), pad(new_mask, 1)], dim=0)

    @staticmethod
    def _trim(cache, mask):
        """Drop cache columns no remaining row attends to (the padding of rows that have left)."""
        start = int(mask.any(0).nonzero()[0])
        if start == 0:
            return cache, mask
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        return cache, mask[:, start:]

    @torch.inference_mode()
    def run(self, rows: Sequence[Row] = (), intake: Callable[[int], list[Row]] | None = None,
            max_rows: int | None = None, on_batch: Callable[[int], Any] | None = None) -> None:
        """Generate ``rows`` (and whatever ``intake(room)`` hands over while they run) until every row ended or
        was cancelled.

        Continuous batching: before every decode step ``intake`` is asked for up to ``room`` waiting rows; they are
        prefilled together and their KV cache joins the running batch (``_merge``), so a request that arrives
        mid-batch starts at the next token instead of waiting for the whole batch. Finished rows leave at once.
        """
        active: list[Row] = []
        pending = list(rows)
        logits = cache = mask = last = None
        while True:
            if intake is not None and (not active or self._mergeable(cache)):
                room = (max_rows or 1 << 30) - len(active) - len(pending)
                if room > 0:
                    pending += intake(room)
            pending = [r for r in pending if not self._cancelled(r)]
            if pending:
                new_logits, new_cache, new_mask, new_last = self._prefill(pending)
                if active:
                    cache, mask = self._merge(cache, mask, new_cache, new_mask)
                    logits, last = torch.cat([logits, new_logits]), torch.cat([last, new_last])
                else:
                    logits, cache, mask, last = new_logits, new_cache, new_mask, new_last
                active, pending = active + pending, []
            if not active:
                return
            if on_batch is not None:
                on_batch(len(active))
            keep, tokens = [], []
            for k, row in enumerate(active):
                if self._cancelled(row):
                    continue
                token = _pick(logits[k], row.sampling, row.generator)
                if not row.push(token):
                    keep.append(k)
                    tokens.append(token)
            if not keep:
                active, cache = [], None
                continue
            if len(keep) < len(active):  # finished/cancelled rows leave the batch: no more compute for them
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, last = mask[index], last[index]
                active = [active[k] for k in keep]
                if self._mergeable(cache):
                    cache, mask = self._trim(cache, mask)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)  # (B, T + 1)
            last = last + 1
            step = torch.tensor(tokens, device=self.device).unsqueeze(1)  # (B, 1)
            logits, cache = self._forward(step, mask, last.unsqueeze(1), cache)

    @staticmethod
    def _cancelled(row: Row) -> bool:
        if row.cancelled.is_set():
            row.cancel_now()
            return True
        return False

    # ---- classification ----
    def encode_classify(self, inputs: list[str | dict[str, str]]) -> list[list[int]]:
        """Event loop: prompt ids of each input, rendered by the run's task from its template (a string fills the
        template's one placeholder, an object fills placeholders by name) and cut as in evaluation."""
        from clmtune.data import Encoder
        from clmtune.tasks.base import fields

        if not self.classifies:
            raise RequestError(f"model {self.model_id!r} is not a classification run (task {self.task_name!r}); "
                               "/v1/classify needs one", param="input", code="not_a_classifier")
        cfg = self.run_cfg.data
        names = list(fields(cfg.template))
        rows = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if len(names) != 1:
                    raise RequestError(f"the run's template {cfg.template!r} has {len(names)} placeholders; send "
                                       f"input[{i}] as an object with keys {names}", param=f"input[{i}]")
                item = {names[0]: item}
            missing = [f for f in names if f not in item]
            if missing:
                raise RequestError(f"input[{i}] lacks {missing} (the template's placeholders: {names})",
                                   param=f"input[{i}]")
            if all(is_blank(str(item[f])) for f in names):  # zero-width characters only: nothing to classify
                raise RequestError(f"input[{i}] is empty; give some text to classify", param=f"input[{i}]")
            rows.append(dict(item))
        examples, dropped = self.task.render_examples(rows, cfg, self.labels, "the request", labelled=False)
        if dropped:  # the checks above should make this impossible; never answer fewer items than asked
            raise RequestError(f"{dropped} input(s) have no text to classify", param="input")
        # cut as `clmtune eval` cuts: room for the longest label + end token (Encoder.eval_reserve)
        prompts, _ = Encoder(self.request_tokenizer, cfg).encode_eval_prompts(examples, self.labels)
        return prompts

    @torch.inference_mode()
    def classify(self, prompts: list[list[int]]) -> list[dict[str, float]]:
        """Worker thread: per-label probabilities of each prompt, a softmax over the labels' rank scores (the
        scoring ``clmtune eval`` uses)."""
        from clmtune.data import Encoder
        from clmtune.rank.scoring import label_scores

        encoder = Encoder(self.tokenizer, self.run_cfg.data)
        scores = label_scores(self.model, encoder, prompts, self.labels, self.run_cfg.eval.batch_size,
                              self.run_cfg.eval.normalize_by_length)  # (n, n_labels)
        probs = torch.softmax(scores.float(), dim=1).tolist()
        return [dict(zip(self.labels, p)) for p in probs]
