"""The model behind the server: loaded once, used by one worker thread, batched generation and classification.

Generation is the one decoding loop of ``clmtune.decoding`` (``Engine`` is a ``Decoder``): every row (one choice of
one request) owns a ``torch.Generator``, rows join the running batch before any decode step (continuous batching),
leave it as soon as they finish or their client goes away, and each row's text goes out as it grows (the same
streamer as ``clmtune generate --stream``, so streamed text equals the final text).

Batched and unbatched forwards are not bitwise equal (other matmul shapes, padding): logits differ by float
rounding (~3e-6 on gpt2-zh-small), which changes a sampled token only when the row's uniform draw falls that
close to a boundary of the cumulative distribution (``decoding.sampling.pick`` samples in float64 to keep that
near 1e-6 per token). Tests check that seeded rows give exactly their one-at-a-time tokens, batched and joining
mid-flight, on the tiny model and on the shipped gpt2-zh-small; bench/bench_serve.py checks the texts of both
servers are equal.
"""

from __future__ import annotations

import copy
import logging

import torch

from clmtune.decoding import Decoder, Row, Sampling, load_for_generation  # noqa: F401  (Row, Sampling: serve's API)
from clmtune.errors import ClmtuneError
from clmtune.models import context_length, is_prompt_learning, resolve_device
from clmtune.run import RunDir
from clmtune.tasks import Task, get_task
from clmtune.tasks.encoding import leading_special_ids
from clmtune.tasks.examples import is_blank

log = logging.getLogger("clmtune")


class RequestError(ClmtuneError):
    """A request the model cannot serve (too long, no chat template, not a classification run): HTTP 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class Engine(Decoder):
    """A model and tokenizer loaded once. Not thread-safe: only the batcher's worker thread calls ``run`` and
    ``classify``; the event loop calls only the ``encode_*``/``check_fits`` helpers (``request_tokenizer``)."""

    def __init__(self, model, tokenizer, model_id: str, task: Task | None = None, labels: list[str] | None = None,
                 run_cfg=None):
        """``task``: the run's task (``None`` for a plain model); a task with labels makes ``/v1/classify``
        available, with ``labels`` (the run's label set) and ``run_cfg`` (its template and eval settings)."""
        super().__init__(model.eval(), tokenizer)
        self.model_id = model_id
        # The event loop encodes requests while the worker thread decodes tokens: a Rust tokenizer used from two
        # threads at once can fail ("Already borrowed"), so each side has its own copy.
        self.request_tokenizer = copy.deepcopy(tokenizer)
        self.task, self.run_cfg = task, run_cfg
        self.labels = list(labels or []) if self.classifies else []
        self.context = context_length(model)
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
