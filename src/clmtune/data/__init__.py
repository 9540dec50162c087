"""Data stage (a foundation): read rows, build prompts, split, tokenize, pad.

Three task shapes (``data.task``), all as "prompt, then a target the model learns to write":

    classify:  input_ids = [pad]*n + prompt_ids + label_ids + [end]       labels: -100 on pad and prompt
    sft:       input_ids = [pad]*n + prompt_ids + response_ids + [end]    labels: -100 on pad and prompt
    lm:        input_ids = text_1 + [end] + text_2 + [end] + ...  cut in block_size blocks   labels = input_ids
    attention = [0]*n + [1]*(real tokens)

Prompt and target are tokenized separately, without special tokens between them, so the target's ids are the
same at training time and at evaluation time (evaluation feeds the prompt ids alone and scores/generates the
target). Padding goes on the left, the decoder-only convention: the last position of every row is real text.

Modules (this package file only re-exports them): ``readers`` is the registry of file formats by suffix (one
module per format); ``sources`` reads files/folders/datasets into rows by the shape of the source; ``load``
turns rows into examples (each task renders its rows, see ``clmtune.tasks``) and splits them; ``encoder`` applies
the shared token-id pieces (``clmtune.tasks.encoding``: prompt truncation, row builders, left-padded batches) for
one tokenizer; ``features`` is the one entry point the stages use (``prepare_data``: examples -> tokenized
``datasets`` splits plus a report of what was read, dropped and truncated). The ``Example`` record and the row
builders live in ``clmtune.tasks`` (below ``data``), so ``tasks`` never imports ``data``.
"""

from __future__ import annotations

from clmtune.data.encoder import ClassificationEncoder, Encoder
from clmtune.tasks.encoding import (build_sft_example, build_train_example, collate, cut_prompt, leading_special_ids,
                                   left_pad, token_ids)
from clmtune.tasks.examples import (IGNORE_INDEX, SPLIT_ORDER, Example, TaskData, map_label, normalize_label,
                                   template_fields)
from clmtune.data.features import Prepared, context_check, load_prepared, prepare_data, save_prepared
from clmtune.data.load import dedup_examples, label_set, load_task, render_examples, split_indices
from clmtune.data.readers import ReadOptions, Reader, read_table, register_reader
from clmtune.data.sources import BUILTIN_PREFIX, HF_PREFIX, RawData, assets_path, load_raw, resolve_source

__all__ = ["BUILTIN_PREFIX", "HF_PREFIX", "IGNORE_INDEX", "SPLIT_ORDER", "ClassificationEncoder", "Encoder", "Example",
           "Prepared", "RawData", "ReadOptions", "Reader", "TaskData", "assets_path", "build_sft_example", "build_train_example", "collate",
           "context_check", "cut_prompt", "dedup_examples", "label_set", "leading_special_ids", "left_pad",
           "load_prepared", "load_raw", "load_task", "map_label", "normalize_label", "prepare_data", "read_table",
           "register_reader", "render_examples", "resolve_source", "save_prepared", "split_indices", "template_fields", "token_ids"]
