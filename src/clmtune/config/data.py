"""The ``data`` section of a run configuration: where the rows come from, what shape of work they are (``task``),
and how they become training sequences."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    source: str = "builtin:raft/twitter_complaints"
    """Where the examples come from: a CSV/TSV/JSON/JSONL/Parquet/TXT file; a folder with its own split files
    (``train.*``, ``dev.*``/``validation.*``, ``test.*``); a RAFT task folder (``train.csv``, ``test_unlabeled.csv``,
    ``task.json``); a folder of ``.txt`` files; ``hf:NAME`` or ``hf:NAME:SUBSET`` for a Hugging Face dataset (needs
    network the first time); or ``builtin:NAME`` for data shipped with clmtune (``builtin:raft/twitter_complaints``,
    ``builtin:raft/banking_77``, ``builtin:chnsenticorp/ChnSentiCorp_htl_all.csv``, ``builtin:chat/chatterbot-zh``)."""

    task: str = "classify"
    """Shape of the work. ``classify``: classification as generation (prompt, then the label's words);
    ``sft``: prompt -> response pairs, loss on the response only; ``lm``: plain causal language modelling on
    ``text_column`` (each text + end token), loss on every real token; ``chat``: multi-turn conversations
    (Alpaca, ShareGPT or OpenAI ``messages`` rows) rendered with a chat template, loss on the assistant's turns."""

    template: str = "Tweet text : {Tweet text} label : "
    """Prompt template (``classify``, ``sft``); ``{column}`` placeholders are filled from each row. The label's
    words (``classify``) or the response (``sft``) follow it."""

    response_template: str = "{response}"
    """``sft`` only: template of the response the model learns to write after the prompt (e.g. ``{output}``)."""

    text_column: str = "text"
    """``lm`` only: column with the text to learn (``.txt`` sources have one column, ``text``)."""

    label_column: str = "Label"
    """Column that holds the gold label (a label name, or an index into ``labels``)."""

    id_column: str = "ID"
    """Column with a row identifier, used in predictions files; row numbers are used when the column is absent."""

    labels: list[str] | None = None
    """Label names (the words the model learns to write). ``None``: from ``task.json`` of a RAFT folder or the
    dataset's ClassLabel names, else the sorted distinct values of the label column. Underscores become spaces
    (``no_complaint`` -> ``no complaint``). Integer labels map to names by position: with ``[差评, 好评]``, 0 -> 差评
    and 1 -> 好评; a value that is neither a name nor a valid position is an error."""

    test_file: str | None = None
    """Optional file of rows to predict (``clmtune eval --split test``), labelled or not. A RAFT folder's
    ``test_unlabeled.csv`` or a folder's ``test.*`` file is used when this is unset."""

    eval_file: str | None = None
    """Optional file of labelled held-out rows; a folder's ``dev.*``/``validation.*`` file is used when this is
    unset. When there is one, ``eval_fraction`` is not used."""

    eval_fraction: float = 0.2
    """Fraction of the labelled rows held out for evaluation when the source has no eval split of its own
    (deterministic, ``seed``); 0 trains on all rows."""

    seed: int = 123
    """Seed of the train/eval split (the tutorial's ``train_test_split(0.2, seed=123)``)."""

    stratify: bool = False
    """``classify`` only: keep the label proportions equal in the train and eval splits."""

    dedup: bool = False
    """Drop rows whose prompt and target repeat an earlier row (counted in the report); duplicates are kept by
    default."""

    delimiter: str | None = None
    """Column separator of CSV/TSV files; ``None``: ``,`` for ``.csv`` and a tab for ``.tsv``."""

    encoding: str = "utf-8"
    """Text encoding of the source files (e.g. ``gbk`` for files saved by older Chinese Windows tools)."""

    text_sample_by: str = "line"
    """``.txt`` sources: one example per ``line``, per ``paragraph`` (blank-line separated) or per ``document``
    (whole file); the same choice as ``datasets``' text loader."""

    max_length: int | None = None
    """Longest training sequence in tokens: prompt + target + end token (``lm`` without packing: text + end).
    ``auto`` (or ``null``, the default): the 99th percentile of the training rows' lengths, at most the model's
    context; how many rows get cut is logged."""

    max_train_rows: int | None = None
    """Train on at most this many rows, sampled from the training split with ``seed`` (the same rows every time);
    ``None``: all. Counted in the report (``rows_before_sampling``)."""

    max_eval_rows: int | None = None
    """Evaluate on at most this many held-out rows, sampled with ``seed``; ``None``: all."""

    truncation_side: str = "left"
    """When a row is too long, the side of the *prompt* that is cut (``left`` keeps the prompt's end, next to the
    label). A classification label and its end token are never cut; an ``sft`` response is cut on the right once
    the prompt is down to half of ``max_length``."""

    end_token: str = "eos"
    """Token appended after the target: the tokenizer's ``eos`` token, or its ``pad`` token (the tutorial's)."""

    padding: str = "longest"
    """``longest``: left-pad each batch to its longest row (fast); ``max_length``: pad every row to
    ``max_length`` (the tutorial's recipe)."""

    pad_to_multiple_of: int | None = None
    """``padding: longest`` only: round each batch's length up to a multiple of this (e.g. 8 for tensor-core or
    oneDNN-friendly shapes); ``None``: exactly the longest row."""

    packing: bool = True
    """``lm`` only: concatenate all texts (each + end token) and cut them into ``block_size`` blocks; ``false``:
    one text per row, cut to ``max_length`` and padded."""

    block_size: int | None = None
    """``lm`` with packing: tokens per block; ``None`` uses ``max_length``. At most the model's context length."""

    prepared: str | None = None
    """Folder written by ``clmtune prepare --save``: training reuses its tokenized splits instead of tokenizing
    again. It must have been prepared with the same data settings and tokenizer."""

    format: str | None = None
    """``chat`` only: the conversation format of the rows, ``alpaca`` (``instruction``, ``input``, ``output``,
    optional ``system`` and ``history``), ``sharegpt`` (``conversations: [{from, value}]``) or ``openai``
    (``messages: [{role, content}]``); ``None``: detected from the columns of the first row."""

    columns: dict[str, str] = field(default_factory=dict)
    """``chat`` only: your column names for the fields of the format, e.g. ``{instruction: prompt, output:
    response}`` or ``{messages: dialog, role: speaker, content: text}``. Fields: instruction, input, output, system,
    history, conversations, messages, role, content."""

    chat_template: str | None = None
    """``chat`` only: how a conversation becomes text. ``None``: the tokenizer's own chat template (an error when it
    has none); ``chatml``, ``alpaca`` or ``zh`` (``用户：…\n助手：…``, for character tokenizers): a built-in
    template; or the path of a ``.jinja`` file. The template used is saved with the run's tokenizer."""

    prompt_column: str = "prompt"
    """``preference`` only: column of the prompt (text, or an OpenAI message list; optional for conversation pairs,
    whose shared messages are the prompt)."""

    chosen_column: str = "chosen"
    """``preference`` only: column of the preferred response (text, or an OpenAI message list)."""

    rejected_column: str = "rejected"
    """``preference`` only: column of the dispreferred response (text, or an OpenAI message list)."""

    train_on: str = "all"
    """``chat`` only: which assistant turns carry the loss, ``all`` (every one, each with its end token) or
    ``last`` (only the final reply). System and user tokens never do."""
