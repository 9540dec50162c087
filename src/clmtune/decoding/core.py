"""The one decoding loop: ``generate``, ``chat``, the server, reply evaluation and ``eval.method: generate`` all
write text through it.

Rows (one continuation of one prompt each) are left-padded and prefilled together, then decoded one token per step
over ``transformers``' KV cache (``DynamicCache``). A row ends at an end token, at a stop string (matched on its
cleaned text, ``text.stops_in``) or at its ``max_tokens``, and leaves the batch at once
(``Cache.batch_select_indices``); rows handed over by ``intake`` join the running batch before any step (their
prompts are prefilled and their KV cache is left-padded and concatenated to the batch's: continuous batching).

Hand-written rather than ``model.generate`` for what ``generate`` lacks: it samples with the process-wide RNG, so
rows of one batch cannot each have their own seed (a seeded row would write other text inside another batch,
and reseeding the global RNG is unsafe when the server's requests overlap); it cannot take new rows into a
running batch; and its ``stop_strings`` match vocabulary strings, not the cleaned text (``text.stops_in``).
Greedy rows still equal ``generate``'s greedy output token for token (tests/test_decoding.py). The plain batch
stays fast: greedy rows are one argmax over the batch on the device, the logits are copied to the CPU only when a
row samples, and the streaming and stop-string work runs only for rows that ask for it.

peft prompt-learning models (prefix, prompt, p-tuning) keep virtual tokens that peft adds inside its own forward
and ``generate``; their rows are run without a cache (the whole row again at every step, through peft's forward):
O(tokens^2) work, acceptable for these small adapters, and exactly the forward their training and scoring see
(peft's own ``generate`` can drift from that forward after the first token: tests/test_decoding.py).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Callable, Sequence

import torch

from clmtune.decoding.sampling import Sampling, pick, row_seed
from clmtune.decoding.text import CleanStreamer, decode, finish_text, raw_text, stop_token_ids, stops_in
from clmtune.models import cache_kwarg, forward_inputs, is_prompt_learning, model_device, output_cache
from clmtune.tasks.encoding import left_pad


class Row:
    """One continuation being generated. ``on_text(row, delta)`` (optional) gets each piece of final text as it is
    known; ``on_done(row)`` is called once when it ends (``finish_reason`` ``stop``, ``length`` or ``cancelled``).
    Seeded by ``row_seed(sampling.seed, choice)``: the same text whatever else runs in the batch."""

    def __init__(self, decoder: "Decoder", prompt_ids: list[int], sampling: Sampling, choice: int = 0,
                 on_text: Callable[["Row", str], Any] | None = None, on_done: Callable[["Row"], Any] | None = None,
                 tag: Any = None):
        self.prompt_ids, self.sampling, self.choice, self.tag = list(prompt_ids), sampling, choice, tag
        self.generator = torch.Generator().manual_seed(row_seed(sampling.seed, choice))
        self.new_ids: list[int] = []
        self.finish_reason: str | None = None
        self.text = ""
        self.cancelled = threading.Event()
        self.tokenizer, self.on_done = decoder.tokenizer, on_done
        self.stop_ids = sorted(set(decoder.stop_ids) | set(sampling.stop_ids))
        self.streamer = None if on_text is None else CleanStreamer(self.tokenizer, lambda s: on_text(self, s),
                                                                   sampling.stop)

    def push(self, token: int) -> bool:
        """Take the next token; True when the row has ended."""
        if token in self.stop_ids:
            return self.finish("stop")
        self.new_ids.append(token)
        if self.streamer is not None:
            self.streamer.add(token)
        if stops_in(self.tokenizer, self.new_ids, self.sampling.stop):
            return self.finish("stop")
        if len(self.new_ids) >= self.sampling.max_tokens:
            return self.finish("length")
        return False

    def finish(self, reason: str) -> bool:
        self.finish_reason = reason
        if reason == "cancelled":
            self.text = finish_text(raw_text(self.tokenizer, self.new_ids), self.sampling.stop)
        else:
            self.text = decode(self.tokenizer, self.new_ids, self.stop_ids, self.sampling.stop)
        if self.streamer is not None and reason != "cancelled":
            self.streamer.close()  # the held-back tail (trailing space, partial character) goes out now
        if self.on_done is not None:
            self.on_done(self)
        return True

    def seen(self) -> list[int]:
        """The tokens a repetition penalty applies to: the prompt's and the new ones."""
        return self.prompt_ids + self.new_ids if self.sampling.repetition_penalty != 1.0 else []


class Batch:
    """The running rows and their state on the device: last logits (B, vocab), KV cache, attention mask (B, T) and
    each row's last position (B,)."""

    def __init__(self, rows: list[Row], logits, cache, mask, last):
        self.rows, self.logits, self.cache, self.mask, self.last = rows, logits, cache, mask, last


class Decoder:
    """Runs rows of one model. Not thread-safe: one thread calls ``run`` at a time."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.device = model_device(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.recompute = is_prompt_learning(model)  # virtual tokens outside the cache: no cache (module docstring)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        self._takes_positions = "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._cache_kwarg = cache_kwarg(model)  # ``past_key_values`` or ``cache``, as the installed transformers

    # ---- one batch of prompts (generate, chat, reply evaluation) ----
    @torch.inference_mode()
    def texts(self, prompts: Sequence[list[int]], sampling: Sampling, n: int = 1, batch_size: int = 8,
              progress: bool = False, desc: str = "generate") -> list[list[str]]:
        """``n`` continuations of each prompt (token ids), in prompt order. Prompts run ``batch_size`` rows at a
        time, longest first, so rows of similar length share a batch (less padding)."""
        from tqdm.auto import tqdm

        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        rows = [Row(self, prompts[i], sampling, choice=j, tag=i) for i in order for j in range(n)]
        per = batch_size * n  # ``batch_size`` prompts with all their choices
        groups = [rows[i:i + per] for i in range(0, len(rows), per)]
        for group in tqdm(groups, desc=desc, disable=not progress or len(groups) < 2, unit="batch"):
            self.run(group)
        out: list[list[str]] = [[] for _ in prompts]
        for r in rows:
            out[r.tag].append(r.text)
        return out

    # ---- the loop ----
    @torch.inference_mode()
    def run(self, rows: Sequence[Row] = (), intake: Callable[[int], list[Row]] | None = None,
            max_rows: int | None = None, on_batch: Callable[[int], Any] | None = None) -> None:
        """Generate ``rows`` (and whatever ``intake(room)`` hands over while they run) until every row ended or
        was cancelled.

        Continuous batching: before every decode step ``intake`` is asked for up to ``room`` waiting rows; they are
        prefilled together and their KV cache joins the running batch (``_merge``), so a request that arrives
        mid-batch starts at the next token instead of waiting for the whole batch. Finished rows leave at once.
        """
        batch: Batch | None = None
        pending = list(rows)
        while True:
            if intake is not None and (batch is None or self._mergeable(batch.cache)):
                room = (max_rows or 1 << 30) - (len(batch.rows) if batch else 0) - len(pending)
                if room > 0:
                    pending += intake(room)
            pending = [r for r in pending if not self._cancelled(r)]
            if pending:
                batch = self._join(batch, self._prefill(pending))
                pending = []
            if batch is None:
                return
            if on_batch is not None:
                on_batch(len(batch.rows))
            batch = self._step(batch)

    def _step(self, batch: Batch) -> Batch | None:
        """Pick every row's next token, drop the rows that ended, run the forward of the next position."""
        plain = [r.sampling.plain_greedy for r in batch.rows]
        greedy = batch.logits.argmax(-1).tolist() if any(plain) else None  # one argmax on the device
        host = batch.logits.cpu() if not all(plain) else None  # one copy for the rows that sample or penalize
        keep, tokens = [], []
        for k, row in enumerate(batch.rows):
            if self._cancelled(row):
                continue
            token = greedy[k] if plain[k] else pick(host[k], row.sampling, row.generator, row.seen())
            if not row.push(token):
                keep.append(k)
                tokens.append(token)
        if not keep:
            return None
        if len(keep) < len(batch.rows):  # finished/cancelled rows leave the batch: no more compute for them
            self._select(batch, keep)
        if self.recompute:
            return self._prefill(batch.rows)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)  # (B, T + 1)
        batch.last = batch.last + 1
        step = torch.tensor(tokens, device=self.device).unsqueeze(1)  # (B, 1)
        batch.logits, batch.cache = self._forward(step, batch.mask, batch.last.unsqueeze(1), batch.cache)
        return batch

    def _forward(self, input_ids, attention_mask, positions, cache):
        """Logits of the last position (B, vocab) in float32, on the model's device, and the cache."""
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.recompute:
            kw = forward_inputs(self.model, kw)  # peft adds its virtual tokens and their mask
        else:
            kw["use_cache"] = True
            if cache is not None:
                kw[self._cache_kwarg] = cache
            if self._takes_positions:
                kw["position_ids"] = positions
        if self._takes_logits_to_keep:
            kw["logits_to_keep"] = 1  # the LM head only on the last position
        out = self.model(**kw)
        return out.logits[:, -1, :].float(), None if self.recompute else output_cache(out)

    def _prefill(self, rows: list[Row]) -> Batch:
        """One forward over the rows' left-padded prompts (with their new tokens, when recomputing)."""
        seqs = [r.prompt_ids + r.new_ids for r in rows]
        ids = left_pad(seqs, self.pad_id).to(self.device)  # (B, T)
        mask = left_pad([[1] * len(s) for s in seqs], 0).to(self.device)  # (B, T)
        # each row counts from its first real token; padding gets 1 (masked out), as ``generate`` numbers it
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, T)
        logits, cache = self._forward(ids, mask, positions, None)
        return Batch(list(rows), logits, cache, mask, positions[:, -1])

    def _join(self, batch: Batch | None, new: Batch) -> Batch:
        if batch is None:
            return new
        if self.recompute:
            return self._prefill(batch.rows + new.rows)
        batch.cache, batch.mask = self._merge(batch.cache, batch.mask, new.cache, new.mask)
        batch.logits, batch.last = torch.cat([batch.logits, new.logits]), torch.cat([batch.last, new.last])
        batch.rows = batch.rows + new.rows
        return batch

    def _select(self, batch: Batch, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.device)
        batch.rows = [batch.rows[k] for k in keep]
        batch.mask, batch.last, batch.logits = batch.mask[index], batch.last[index], batch.logits[index]
        if batch.cache is not None:
            batch.cache.batch_select_indices(index)
            if self._mergeable(batch.cache):
                batch.cache, batch.mask = self._trim(batch.cache, batch.mask)

    @staticmethod
    def _mergeable(cache) -> bool:
        """Caches whose layers are plain growing tensors (no sliding window, no offset bookkeeping) can be padded
        and concatenated along the batch."""
        from transformers.cache_utils import DynamicLayer

        return cache is not None and all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))

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

    @staticmethod
    def _cancelled(row: Row) -> bool:
        if row.cancelled.is_set():
            row.finish("cancelled")
            return True
        return False
