"""The encoder of one tokenizer + data settings: training rows, evaluation prompts, label ids."""

from __future__ import annotations

from typing import Sequence

from clmtune.config import DataConfig
from clmtune.tasks.encoding import cut_prompt, leading_special_ids, token_ids
from clmtune.tasks.examples import Example
from clmtune.errors import ClmtuneError
from clmtune.tasks import get_task


class Encoder:
    """Turns examples into token ids for training (prompt + target + end, built by the task) and for evaluation
    (prompt only, cut like in training); resolves the prefix (BOS), end and pad ids once."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
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
        out = get_task(self.cfg.task).encode(
            {"prompt": [e.prompt for e in examples], "target": [e.target or e.label for e in examples]},
            self.tokenizer, self.prefix, self.end_id, self.cfg)
        feats = [{"input_ids": i, "labels": lab} for i, lab in zip(out["input_ids"], out["labels"])]
        return feats, sum(out["truncated"])

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
