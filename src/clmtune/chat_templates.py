"""Chat templates: the tokenizer's own, or a built-in one (``chatml``, ``alpaca``, ``zh``), as Jinja.

Templates are plain Hugging Face chat templates, so ``tokenizer.apply_chat_template`` renders them and the chosen
one is stored in the run's tokenizer (``tokenizer.chat_template``, saved as ``chat_template.jinja``): generation,
``clmtune chat`` and any server format prompts exactly as training did. Every built-in template wraps the
assistant's reply and its end marker in ``{% generation %}`` ... ``{% endgeneration %}``, so
``apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)`` marks the supervised tokens.

    chatml  <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n
    alpaca  {system}\\n\\n### Instruction:\\n{q}\\n\\n### Response:\\n{a}{eos}\\n\\n
    zh      {system}\\n用户：{q}\\n助手：{a}{eos}\\n

``zh`` suits character tokenizers such as the BERT one of ``builtin:gpt2-zh-small`` (it drops the newlines, so a
turn is ``用户：…助手：…[SEP]``). When the tokenizer puts a BOS in front of text (OPT, LLaMA), the built-in template
starts with ``{{ bos_token }}``, so the rendered conversation tokenizes as the model saw text in pretraining.
"""

from __future__ import annotations

import re
from pathlib import Path

from clmtune.errors import ClmtuneError

_CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_ALPACA = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}"
    "{{- '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{%- else %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}{{- '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

_ZH = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '用户：' + message['content'] + '\\n助手：' }}"
    "{%- else %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}{{- '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

BUILTIN_TEMPLATES = {"chatml": _CHATML, "alpaca": _ALPACA, "zh": _ZH}
"""Built-in templates by name (``data.chat_template``). ``alpaca`` and ``zh`` put the assistant prompt after the
user message, so ``add_generation_prompt`` adds nothing; ``chatml`` adds ``<|im_start|>assistant\\n``."""
_BOS = "{{- bos_token }}"
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_blocks(template: str) -> bool:
    """Whether ``apply_chat_template(..., return_assistant_tokens_mask=True)`` can mark the assistant's tokens."""
    return bool(_GENERATION.search(template))


def builtin_template(name: str, tokenizer=None) -> str:
    """The Jinja text of a built-in template, with ``{{ bos_token }}`` first when ``tokenizer`` adds a BOS."""
    if name not in BUILTIN_TEMPLATES:
        raise ClmtuneError(f"data.chat_template={name!r} is not a built-in template; use one of "
                           f"{', '.join(BUILTIN_TEMPLATES)} or the path of a .jinja file")
    text = BUILTIN_TEMPLATES[name]
    if tokenizer is not None:
        from clmtune.tasks.encoding import leading_special_ids

        if leading_special_ids(tokenizer):
            text = _BOS + text
    return text


def resolve_chat_template(tokenizer, name: str | None = None) -> tuple[str, str]:
    """(template text, where it came from): ``name`` (a built-in name or a ``.jinja`` file) when given, else the
    tokenizer's own template; neither -> one error line with the fix."""
    if name:
        if name in BUILTIN_TEMPLATES:
            return builtin_template(name, tokenizer), name
        path = Path(name).expanduser()
        if path.suffix == ".jinja" and path.is_file():
            return path.read_text(encoding="utf-8"), str(path)
        raise ClmtuneError(f"data.chat_template={name!r} is neither a built-in template ("
                           f"{', '.join(BUILTIN_TEMPLATES)}) nor an existing .jinja file")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if own:
        return own, "tokenizer"
    raise ClmtuneError("the model's tokenizer has no chat template and data.chat_template is not set; set "
                       f"data.chat_template to one of {', '.join(BUILTIN_TEMPLATES)} (zh suits Chinese character "
                       "tokenizers) or to a .jinja file")


def install_chat_template(tokenizer, name: str | None = None) -> str:
    """Resolve the template and store it in ``tokenizer.chat_template`` (saved with the tokenizer); returns where
    it came from (``chatml``, ``tokenizer``, a file path)."""
    text, source = resolve_chat_template(tokenizer, name)
    tokenizer.chat_template = text
    return source


END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
"""End-of-turn markers of common templates (ChatML/Qwen, Llama 3, Phi-3, Gemma)."""


def reply_stops(tokenizer) -> tuple[list[int], list[str]]:
    """What ends an assistant reply under ``tokenizer.chat_template``, besides the end token: the ids of the end
    markers the template writes that are single tokens, and as text those that are not (``<|im_end|>`` in a
    vocabulary without it is seven BPE pieces)."""
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    ids, strings = [], []
    for marker in END_MARKERS:
        if marker in template:
            if marker in vocab:
                ids.append(vocab[marker])
            else:
                strings.append(marker)
    return ids, strings
