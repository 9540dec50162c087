"""``lm``: plain text (``data.text_column``), every token learned.

    packing:     input_ids = concat(prefix + text_i + [end]) cut into block_size blocks; labels = input_ids
    no packing:  input_ids = (prefix + text + [end])[:max_length];                     labels = input_ids
Evaluated by perplexity on the held-out split.
"""

from __future__ import annotations

from clmtune.tasks.encoding import token_ids
from clmtune.tasks.examples import Example, cell_text, check_columns
from clmtune.tasks.base import Task


class LmTask(Task):
    name = "lm"

    def length_limit(self, d) -> tuple[str, int]:
        if d.packing and d.block_size is not None:
            return "data.block_size", d.block_size
        return "data.max_length", d.max_length

    def check_columns(self, d, columns, where):
        check_columns("data.text_column", [d.text_column], columns, where, "column")

    def example(self, row, i, rid, d, labels, where, labelled) -> Example | None:
        text = cell_text(row[d.text_column], d.text_column)
        if not text.strip():
            return None
        return Example(id=rid, prompt="", label=None, text=text, target=text)

    def encode(self, batch, tokenizer, prefix, end_id, d) -> dict:
        """prefix + text + end per row, cut on the right to ``max_length`` unless packing."""
        cut_to = None if d.packing else d.max_length
        out = {"input_ids": [], "truncated": [], "prompt_len": [], "target_len": []}
        for t in token_ids(tokenizer, batch["target"]):
            ids = prefix + t + [end_id]
            out["target_len"].append(len(ids))
            out["prompt_len"].append(0)
            out["truncated"].append(cut_to is not None and len(ids) > cut_to)
            out["input_ids"].append(ids[:cut_to] if cut_to is not None else ids)
        return out

    def finish_split(self, ds, stats, d):
        import datasets

        if not d.packing:
            return ds.add_column("labels", ds.data.column("input_ids"))
        block = d.block_size or d.max_length
        columns, dropped = pack(ds.data.column("input_ids"), block)
        stats.update(block_size=block, tokens=int(sum(len(b) for b in columns["input_ids"])),
                     tail_tokens_dropped=dropped)
        return datasets.Dataset.from_dict(columns)


def pack(ids_column, block_size: int) -> tuple[dict[str, list], int]:
    """Concatenate all rows and cut them into blocks of ``block_size`` tokens.

    Hand-written (transformers' run_clm ``group_texts`` is an example script, not a library function, and drops a
    remainder per 1,000-row batch): here only the final remainder is short, kept as a last shorter block when it
    has >= 2 tokens (one token predicts nothing). Returns (columns, tokens dropped). Blocks cross text boundaries;
    the end token between texts tells the model where one stops.
    """
    flat = ids_column.combine_chunks().flatten().to_numpy()  # (N_tokens,), one copy out of Arrow
    n_full = len(flat) // block_size
    blocks = flat[:n_full * block_size].reshape(n_full, block_size).tolist()  # (n_full, block_size)
    rest = flat[n_full * block_size:]
    dropped = 0
    if len(rest) >= 2:
        blocks.append(rest.tolist())
    else:
        dropped = len(rest)
    return {"input_ids": blocks, "labels": blocks}, dropped
