"""Constrained evaluation: greedy decoding restricted to the label prefix tree (``eval.method: constrained``).

At every step a row may only continue with a token that keeps it on some label's token sequence (label tokens +
end token), and it picks the most likely of those. So the output is always a label (never invalid, unlike
``generate``), at about the cost of ``generate``:

- one prefill over the left-padded prompts with the KV cache, then one single-token step per tree level;
- a row stops as soon as only one label is left below its node (banking_77: most rows after 2-3 steps, though
  labels are up to 9 tokens long), and the batch stops when every row has;
- no LM head over the whole vocabulary: the head is skipped (its input, the last hidden state, is returned) and
  only the rows of the head's weight for the allowed tokens are multiplied. The argmax over the allowed tokens
  does not need the softmax's normaliser, and any monotone map the model applies to its logits (soft-capping,
  scaling) does not change it. A head that is not a plain linear layer (an adapter on it) is run as is.

Unlike ``rank`` this is greedy: the first token is chosen without looking at the rest of the label, so the two can
disagree when a label's first token is likely but its continuation is not.
"""

from __future__ import annotations

import inspect

import torch

from clmtune.rank.headscore import head_returns_hidden, linear_head
from clmtune.rank.labeltree import Trie
from clmtune.models import cache_kwarg, output_cache
from clmtune.tasks.encoding import left_pad


def _accepts_position_ids(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "position_ids" in inspect.signature(base.forward).parameters


@torch.no_grad()
def constrained_decode(model, prompts: list[list[int]], conts: list[list[int]], pad_id: int, batch_size: int,
                       progress: bool = False) -> list[int]:
    """For each prompt (token ids), the index of the continuation (label tokens + end token) that greedy
    decoding restricted to ``conts``' prefix tree writes."""
    from tqdm.auto import tqdm

    trie = Trie.build(conts)
    device = next(model.parameters()).device
    bypass = linear_head(model)
    pos_ids = _accepts_position_ids(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    result = [-1] * len(prompts)
    groups = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    with head_returns_hidden(bypass and bypass[0]):
        for group in tqdm(groups, desc="eval (constrained)", disable=not progress, unit="batch"):
            ids = left_pad([prompts[i] for i in group], pad_id).to(device)  # (B, T)
            mask = left_pad([[1] * len(prompts[i]) for i in group], 0).to(device)  # (B, T)
            node = [0] * len(group)
            cache, inputs = None, ids
            while True:
                active = [b for b, n in enumerate(node) if trie.label[n] < 0]
                if not active:
                    break
                kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, -inputs.shape[1]:]} if pos_ids else {}
                out = model(input_ids=inputs, attention_mask=mask, use_cache=True, logits_to_keep=1,
                            **{cache_kwarg(model): cache}, **kwargs)
                cache = output_cache(out)
                last = out.logits[:, -1]  # (B, d) hidden states when bypassed, else (B, V) logits
                step = torch.full((len(group), 1), pad_id, dtype=torch.long, device=device)
                for b in active:
                    allowed = list(trie.children[node[b]])
                    if len(allowed) == 1:
                        tok = allowed[0]
                    else:
                        idx = torch.tensor(allowed, device=device)
                        if bypass:
                            _, w, bias = bypass
                            s = w[idx].float() @ last[b].float()  # (k,)
                            if bias is not None:
                                s = s + bias[idx].float()
                        else:
                            s = last[b].float()[idx]
                        tok = allowed[int(s.argmax())]
                    node[b] = trie.children[node[b]][tok]
                    step[b, 0] = tok
                inputs = step
                mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            for b, i in enumerate(group):
                result[i] = trie.label[node[b]]
    return result
