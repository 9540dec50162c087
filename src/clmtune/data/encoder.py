"""The encoder of one tokenizer + data settings: training rows, evaluation prompts, label ids."""

from __future__ import annotations

from typing import Sequence

from clmtune.config import DataConfig
from clmtune.tasks.encoding import cut_prompt, leading_special_ids, token_ids
from clmtune.tasks.examples import Example
from clmtune.errors import ClmtuneError
from clmtune.tasks import Task, get_task


class Encoder:
    """Turns examples into token ids for training (prompt + target + end, built by the task) and for evaluation
    (prompt only, cut like in training); resolves the prefix (BOS), end and pad ids once."""

    def __init__(self, tokenizer, cfg: DataConfig, shape: Task | None = None):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.shape = shape
        """The task resolved by the caller; ``encode_train`` looks it up from ``cfg.task`` when not given."""
        self.prefix = leading_special_ids(tokenizer)
        self.end_id = tokenizer.eos_token_id if cfg.end_token == "eos" else tokenizer.pad_token_id
        if self.end_id is None:
            raise ClmtuneError(f"data.end_token={cfg.end_token!r} but the tokenizer has no {cfg.end_token} token; "
                               "use the other end_token")
        self.pad_id = tokenizer.pad_token_id

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return token_ids(self.tokenizer, texts)

    def label_ids(self, labels: Sequence[str]) -> list[list[int]]:
        """Token ids of each label's words, as they appear after the prompt during training."""
        return self.encode_texts(labels)

    def encode_train(self, examples: Sequence[Example]) -> tuple[list[dict[str, list[int]]], int]:
        """Unpadded training features and the number of rows whose prompt was cut to fit ``max_length``.

        The same row builder as ``prepare_data`` (the task's ``encode``), without ``datasets``.
        """
        task = self.shape or get_task(self.cfg.task)
        out = task.encode(task.example_columns(examples), self.tokenizer, self.prefix, self.end_id, self.cfg)
        feats = [{"input_ids": i, "labels": lab} for i, lab in zip(out["input_ids"], out["labels"])]
        return feats, sum(out["truncated"])

    def eval_reserve(self, labels: Sequence[str]) -> int:
        """Tokens an evaluation prompt leaves free after it: the longest label + the end token. The one definition
        of a truncated evaluation prompt, used by ``rank`` and ``generate`` alike (and by ``prepare``'s report): a
        prompt is cut when prompt + longest label + end token > ``data.max_length``. Training cuts a row when
        prompt + *its own* label + end token do not fit, so with labels of different token lengths evaluation
        can cut a few rows more than training did."""
        return max(len(c) for c in self.label_ids(labels)) + 1

    def encode_eval_prompts(self, examples: Sequence[Example], labels: Sequence[str]) -> tuple[list[list[int]], int]:
        """Prompt ids for evaluation and how many were cut (``eval_reserve``)."""
        return self.encode_prompts(examples, reserve=self.eval_reserve(labels))

    def encode_prompts(self, examples: Sequence[Example], reserve: int = 0) -> tuple[list[list[int]], int]:
        """Prompt ids for evaluation, cut the same way as in training so that ``reserve`` tokens still fit."""
        out, truncated = [], 0
        for p in self.encode_texts([e.prompt for e in examples]):
            ids = self.prefix + p
            room = self.cfg.max_length - reserve
            if len(ids) > room:
                ids = cut_prompt(ids, room, self.cfg.truncation_side, len(self.prefix))
                truncated += 1
            out.append(ids)
        return out, truncated


ClassificationEncoder = Encoder  # the name the tests and older callers use


def label_token_problems(tokenizer, labels: Sequence[str], label_ids: Sequence[Sequence[int]],
                         end_id: int) -> list[str]:
    """Labels the model could not tell apart: two labels whose token ids (+ end token) are equal (``Good``/``good``
    after a lower-casing tokenizer), or a label containing the unknown token (``😀`` -> ``[UNK]``). Training would
    "succeed" and predict one label for every row, so this is checked before anything is trained."""
    tok = tokenizer.convert_ids_to_tokens
    seqs = [tuple(ids) + (end_id,) for ids in label_ids]
    problems, seen = [], {}
    for lab, seq in zip(labels, seqs):
        seen.setdefault(seq, []).append(lab)
    for seq, same in seen.items():
        if len(same) > 1:
            problems.append(f"labels {same} all tokenize to {tok(list(seq))}")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        for lab, seq in zip(labels, seqs):
            if unk in seq:
                problems.append(f"label {lab!r} tokenizes to {tok(list(seq))}, with the unknown token "
                                f"{tokenizer.unk_token!r}")
    return problems


def check_label_tokens(encoder: Encoder, labels: Sequence[str]) -> None:
    """Raise one error naming every label problem of ``label_token_problems``."""
    problems = label_token_problems(encoder.tokenizer, labels, encoder.label_ids(labels), encoder.end_id)
    if problems:
        raise ClmtuneError("the model cannot tell the labels apart: " + "; ".join(problems) + "; use label words "
                           "that this tokenizer knows and writes differently (rename them in the data, or map "
                           "integer labels with data.labels: [positive, negative])")
