"""``sft``: a prompt from ``data.template``, then a free-text response from ``data.response_template``.

    input_ids = prompt_ids + response_ids + [end]     labels: -100 on the prompt
Evaluated by perplexity on the held-out split (response tokens only) and by generated responses scored
against the references (character ROUGE-L, BLEU-4, exact match).
"""

from __future__ import annotations

from clmtune.tasks.encoding import build_sft_example
from clmtune.tasks.examples import Example, cell_text
from clmtune.tasks.base import Task, check_template_columns, fields, template_warnings
from clmtune.tasks.classify import encode_pairs
from clmtune.templates import fill_template


class SftTask(Task):
    name = "sft"

    def config_warnings(self, d) -> list[str]:
        return template_warnings(d)

    def check_columns(self, d, columns, where):
        check_template_columns(d, columns, where, response=True)

    def example(self, row, i, rid, d, labels, where, labelled) -> Example | None:
        p_fields, r_fields = fields(d.template), fields(d.response_template, "data.response_template")
        values = {f: cell_text(row[f], f) for f in p_fields}
        if p_fields and not any(v.strip() for v in values.values()):
            return None
        r_values = {f: cell_text(row[f], f) for f in r_fields}
        if r_fields and not any(v.strip() for v in r_values.values()):
            return None
        return Example(id=rid, prompt=fill_template(d.template, values), label=None, text=" ".join(values.values()),
                       target=fill_template(d.response_template, r_values))

    def encode(self, batch, tokenizer, prefix, end_id, d) -> dict:
        return encode_pairs(batch, tokenizer, prefix, end_id, d, build_sft_example)
