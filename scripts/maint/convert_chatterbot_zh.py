"""Convert the Chinese chatterbot-corpus YAML files into clmtune's shipped chat data (OpenAI ``messages`` JSONL).

    python scripts/maint/convert_chatterbot_zh.py [--src ../shared/data/chat/chatterbot-corpus/chinese]

Each YAML conversation (turns alternating user, assistant, starting with the user) becomes one line
``{"id": "ai-0001", "topic": "AI", "messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}`` in
``src/clmtune/assets/chat/chatterbot-zh/train.jsonl``. A final user turn with no reply is dropped (counted in
``stats.json`` and the data card). Text is kept as written, only stripped of surrounding whitespace. The counts
the data card quotes are written to ``stats.json`` beside the data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# ../shared beside the checkout (CI), or two levels up for a git worktree under wt/.
_CANDIDATES = [base / "shared" / "data" / "chat" / "chatterbot-corpus" / "chinese" for base in REPO.parents[:2]]
DEFAULT_SRC = next((c for c in _CANDIDATES if c.is_dir()), _CANDIDATES[0])
OUT = REPO / "src" / "clmtune" / "assets" / "chat" / "chatterbot-zh"


def convert(src: Path, out: Path) -> dict:
    lines, topics = [], {}
    stats = {"files": 0, "conversations_in": 0, "turns_in": 0, "final_user_turns_dropped": 0}
    for path in sorted(src.glob("*.yml")):
        stats["files"] += 1
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        topic = (doc.get("categories") or [path.stem])[0]
        for k, conv in enumerate(doc["conversations"], 1):
            stats["conversations_in"] += 1
            stats["turns_in"] += len(conv)
            turns = [str(t).strip() for t in conv]
            if any(not t for t in turns):
                raise SystemExit(f"{path} conversation {k} has an empty turn; fix the converter")
            if len(turns) % 2:
                turns = turns[:-1]
                stats["final_user_turns_dropped"] += 1
            msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            lines.append({"id": f"{path.stem}-{k:04d}", "topic": topic, "messages": msgs})
            topics[topic] = topics.get(topic, 0) + 1
    if not stats["files"]:
        raise SystemExit(f"no .yml files in {src}; give the corpus's chinese/ folder with --src")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as fh:
        for rec in lines:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    stats.update({"conversations": len(lines), "turns": sum(len(r["messages"]) for r in lines),
                  "user_assistant_pairs": sum(len(r["messages"]) // 2 for r in lines),
                  "multi_pair_conversations": sum(len(r["messages"]) > 2 for r in lines),
                  "topics": dict(sorted(topics.items(), key=lambda kv: -kv[1]))})
    (out / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    print(json.dumps(convert(args.src, args.out), ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
