"""The label prefix tree: the label continuations (label tokens + end token) as a tree of their prefixes, built
once and read by every method that walks it: ``constrained`` (greedy decoding on it), ``rank``'s best-first
search (``search``) and ``rank``'s one-forward scoring (``scoring.LabelTree``, a view of its inner nodes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Trie:
    """Label continuations as a prefix tree. Node 0 is the root (right after the prompt)."""

    children: list[dict[int, int]] = field(default_factory=lambda: [{}])
    label: list[int] = field(default_factory=lambda: [-1])
    """For each node, the index of the only label below it, or -1 when there are several."""
    n_nodes: int = 1

    @staticmethod
    def build(conts: list[list[int]]) -> "Trie":
        t = Trie()
        below: list[set[int]] = [set()]
        for j, c in enumerate(conts):
            node = 0
            below[0].add(j)
            for tok in c:
                nxt = t.children[node].get(tok)
                if nxt is None:
                    nxt = len(t.children)
                    t.children[node][tok] = nxt
                    t.children.append({})
                    below.append(set())
                node = nxt
                below[node].add(j)
        t.label = [next(iter(b)) if len(b) == 1 else -1 for b in below]
        t.n_nodes = len(t.children)
        return t
