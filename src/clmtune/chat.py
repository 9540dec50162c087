"""Chat stage: a multi-turn conversation with a model in the terminal (``clmtune chat``).

Every turn renders the whole conversation with the tokenizer's chat template (the one training saved into the run's
tokenizer, so prompts look exactly as in training) plus the assistant's generation prompt, and streams the reply
as it is generated. History is kept within the model's context: when system + history + the new message +
``max_new_tokens`` do not fit, the oldest complete user/assistant pairs are left out (the system prompt stays),
as training truncates conversations. Commands: ``/reset`` (forget the history), ``/system TEXT`` (set the system
prompt; ``/system`` alone removes it), ``/history`` (show what the model sees), ``/exit`` (or Ctrl-D).

Decoding is the one loop of ``clmtune.decoding`` (sampling settings, stop tokens and strings, the cleaning
streamer), so a chat reply is decoded exactly like ``clmtune generate`` output and a ``clmtune serve`` reply.
"""

from __future__ import annotations

import sys
from typing import Callable

from clmtune.chat_templates import reply_stops
from clmtune.config import GenerateConfig
from clmtune.decoding import Decoder, Row, Sampling
from clmtune.errors import ClmtuneError
from clmtune.models import context_length
from clmtune.tasks.examples import drop_oldest_turns
from clmtune.text import plural

HELP = "commands: /reset  /system TEXT  /history  /exit"


class ChatSession:
    """One conversation: the system prompt, the turns so far, and how to get the next reply."""

    def __init__(self, model, tokenizer, settings: GenerateConfig | None = None, system: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ClmtuneError("this model's tokenizer has no chat template; chat with a run trained with "
                               "data.task: chat (its tokenizer keeps the template), or a model that has one")
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or GenerateConfig(max_new_tokens=64, temperature=0)
        self.system = system or None
        self.history: list[dict[str, str]] = []
        self.left_out = 0  # pairs of the last prompt that did not fit the context
        marker_ids, marker_texts = reply_stops(tokenizer)  # the template's end of a reply, as an id or as text
        self.sampling = Sampling.of(self.settings, stop=list(self.settings.stop) + marker_texts, stop_ids=marker_ids)
        self.decoder = Decoder(model, tokenizer)
        ctx = context_length(model)
        self.room = None if ctx is None else ctx - self.settings.max_new_tokens
        if self.room is not None and self.room < 1:
            raise ClmtuneError(f"max_new_tokens={self.settings.max_new_tokens} leaves no room for the conversation in "
                               f"the model's context of {ctx} tokens; lower it")

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        self.system = text.strip() if text and text.strip() else None

    def messages(self, user: str | None = None) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return head + self.history + tail

    def prompt_ids(self, user: str) -> list[int]:
        """Template(system + history + user) + the generation prompt, oldest pairs left out until it fits."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        msgs = head + self.history + [{"role": "user", "content": user}]
        ids, self.left_out = drop_oldest_turns(
            msgs, lambda m: list(self.tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=True,
                                                                    return_dict=True)["input_ids"]), len, self.room)
        if self.room is not None and len(ids) > self.room:
            raise ClmtuneError(f"this message needs {len(ids)} tokens with the system prompt but only "
                               f"{self.room} fit (context minus max_new_tokens); shorten it or lower "
                               "--max-new-tokens")
        return ids

    def send(self, user: str, write: Callable[[str], object] | None = None,
             flush: Callable[[], object] | None = None) -> str:
        """The assistant's reply to ``user`` (streamed to ``write`` as it comes); both join the history."""
        if not user.strip():
            raise ClmtuneError("the message is empty; type some text")
        ids = self.prompt_ids(user)

        def on_text(row, text: str) -> None:
            write(text)
            if flush:
                flush()

        row = Row(self.decoder, ids, self.sampling, on_text=None if write is None else on_text)
        self.decoder.run([row])
        if write is not None:
            write("\n")
        reply = row.text
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply or "…"}]
        return reply


def repl(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], object] | None = None,
         flush: Callable[[], object] | None = None) -> int:
    """Read messages and commands until ``/exit`` or end of input; returns the number of replies."""
    write = write or sys.stdout.write
    flush = flush or (sys.stdout.flush if write is sys.stdout.write else None)
    write(f"clmtune chat ({HELP}; Ctrl-D ends)\n")
    replies = 0
    while True:
        try:
            line = read("user> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return replies
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return replies
        if text == "/reset":
            session.reset()
            write("(history cleared)\n")
        elif text == "/system" or text.startswith("/system "):
            session.set_system(text[len("/system"):])
            write(f"(system prompt: {session.system or 'none'})\n")
        elif text == "/history":
            for m in session.messages():
                write(f"{m['role']}: {m['content']}\n")
            write(f"({plural(len(session.history) // 2, 'turn')} kept)\n")
        elif text.startswith("/"):
            write(f"(unknown command {text.split()[0]}; {HELP})\n")
        else:
            write("assistant> ")
            if flush:
                flush()
            try:
                session.send(text, write=write, flush=flush)
            except ClmtuneError as exc:
                write(f"(error: {exc})\n")
                continue
            replies += 1
            if session.left_out:
                write(f"({session.left_out} oldest turn(s) left out to fit the context)\n")
        if flush:
            flush()
