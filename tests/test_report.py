"""Pictures with Chinese, loss curves and the HTML run report (issue 16), on real tiny runs and a real browser."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import pytest

from browser import needs_chromium
from clmtune.data import assets_path
from clmtune.errors import ClmtuneError

LABELS = ["差评", "好评"]


@pytest.fixture
def glyph_misses(monkeypatch):
    """Every glyph matplotlib could not find in any font while drawing, recorded where matplotlib reports it (the
    confusion-matrix code silences the UserWarning itself, so a warnings filter would see nothing)."""
    import matplotlib._text_helpers as text_helpers

    misses: list[tuple[int, str]] = []
    monkeypatch.setattr(text_helpers, "warn_on_missing_glyph", lambda cp, fonts: misses.append((cp, fonts)))
    return misses


def test_confusion_matrix_draws_chinese_labels_with_a_cjk_font(tmp_path, glyph_misses):
    import matplotlib
    import matplotlib.pyplot as plt

    from clmtune.evaluate import plot_confusion_matrix

    # control: with matplotlib's default font alone, 好评 is two missing glyphs (so the recorder works)
    matplotlib.rcParams["font.sans-serif"] = ["DejaVu Sans"]
    fig, ax = plt.subplots()
    ax.set_title("好评")
    fig.savefig(tmp_path / "control.png")
    plt.close(fig)
    assert [cp for cp, _ in glyph_misses] == [ord("好"), ord("评")]
    glyph_misses.clear()

    matrix = {"labels": LABELS, "rows_gold_cols_predicted": [[40, 10], [5, 95]], "invalid_per_gold": [0, 0]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no MissingGlyphWarning from clmtune either
        png = plot_confusion_matrix(matrix, tmp_path / "cm.png", "ChnSentiCorp 好评/差评")
    assert glyph_misses == []
    assert png.stat().st_size > 5000
    assert matplotlib.rcParams["font.sans-serif"][-1] == "DejaVu Sans"  # the Latin fallback stays


def test_missing_glyphs_warn_once():
    from clmtune import fonts

    fonts.use_cjk_font(["好评"])
    assert fonts.missing_glyphs(["好评 accuracy 0.91"]) == set()
    odd = "\uffff"  # a Unicode noncharacter: no font maps it
    with pytest.warns(fonts.MissingGlyphWarning, match="fonts-noto-cjk"):
        fonts.use_cjk_font(["好评", odd])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fonts.use_cjk_font([odd])  # the same missing characters: no second warning


@pytest.mark.skipif(shutil.which("fc-list") is None, reason="fontconfig not installed")
def test_cjk_font_found_through_fontconfig_when_matplotlib_cache_lacks_it(monkeypatch):
    from matplotlib import font_manager

    from clmtune import fonts

    fm = font_manager.fontManager
    without_cjk = [f for f in fm.ttflist if f.name not in fonts.CJK_FAMILIES]
    monkeypatch.setattr(fm, "ttflist", without_cjk)
    fonts.find_cjk_font.cache_clear()
    try:
        if not any(fam in fonts.CJK_FAMILIES for fam, _ in fonts._fontconfig_files()):
            pytest.skip("fontconfig knows no CJK font on this machine")
        family = fonts.use_cjk_font()  # configures rcParams with the font fontconfig found
        assert family is not None and family in {f.name for f in fm.ttflist}  # registered from fontconfig's file
        assert fonts.missing_glyphs(["好评"]) == set()
    finally:
        fonts.find_cjk_font.cache_clear()


def test_smooth_and_series():
    from clmtune.curves import series, smooth

    assert smooth([]) == []
    values = [4.0, 2.0, 2.0]
    w = 1.8 * (1 / (1 + 2.718281828459045 ** (-0.05 * 3)) - 0.5)
    assert smooth(values) == pytest.approx([4.0, 4.0 * w + 2.0 * (1 - w), (4.0 * w + 2.0 * (1 - w)) * w + 2 * (1 - w)])
    recs = [{"step": 1, "loss": 3.0, "learning_rate": 1e-3}, {"step": 2, "loss": 2.0},
            {"step": 2, "eval_loss": 2.5, "eval_accuracy": 0.6}, {"step": 1, "loss": 2.9},  # a resumed step replaces
            {"note": "no step"}, {"step": 3, "loss": float("nan")}]
    s = series(recs)
    assert s["loss"] == ([1, 2], [2.9, 2.0])
    assert s["eval_loss"] == ([2], [2.5]) and s["eval_accuracy"] == ([2], [0.6])
    assert s["learning_rate"] == ([1], [1e-3])


def _chinese_csv(tmp_path: Path, n: int = 48) -> Path:
    rows = list(csv.DictReader(open(assets_path("chnsenticorp/ChnSentiCorp_htl_all.csv"), encoding="utf-8")))
    rows = [r for r in rows if r["review"].strip()]
    pick = rows[:n // 2] + rows[-(n // 2):]  # the file is sorted by label: take both
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["label", "review"])
        w.writeheader()
        w.writerows(pick)
    return path


@pytest.fixture(scope="module")
def zh_runs(tmp_path_factory):
    """Two tiny trained and evaluated 好评/差评 runs (LoRA and full fine-tuning) on 48 real reviews."""
    import torch

    from clmtune.config import load_config
    from clmtune.evaluate import evaluate_run
    from clmtune.train import train

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("zh_runs")
    data = _chinese_csv(tmp)
    runs = []
    for method, lr in (("lora", 1e-2), ("full", 1e-3)):
        cfg = load_config(overrides={
            "data": {"source": str(data), "task": "classify", "template": "评论：{review} 评价：",
                     "label_column": "label", "labels": LABELS, "eval_fraction": 0.25, "max_length": 64,
                     "end_token": "eos"},
            "model": {"name_or_path": "builtin:tiny-gpt2-zh"},
            "peft": {"method": method},
            "train": {"output_dir": str(tmp / f"classify-{method}"), "max_steps": 12, "batch_size": 8,
                      "learning_rate": lr, "seed": 3}})
        res = train(cfg, progress=False)
        evaluate_run(res.output_dir, "eval", progress=False)
        runs.append(res.output_dir)
    return runs


@pytest.mark.slow
def test_plot_loss_from_a_real_run(zh_runs, tmp_path, glyph_misses):
    from PIL import Image

    from clmtune.curves import plot_loss
    from clmtune.report.runs import read_run

    run = read_run(zh_runs[0])
    assert len([r for r in run.log if "loss" in r]) == 12
    png = plot_loss(run.log + [{"step": 6, "eval_loss": 1.0, "eval_accuracy": 0.5}], tmp_path / "loss.png",
                    title="LoRA 好评/差评")
    assert glyph_misses == []
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 600  # two panels: loss and the metric
    with pytest.raises(ValueError, match="no record"):
        plot_loss([{"step": 1, "learning_rate": 1e-3}], tmp_path / "x.png")


@pytest.mark.slow
def test_report_html_content(zh_runs, tmp_path):
    from clmtune.report import write_report
    from clmtune.report.runs import read_run

    out = write_report(zh_runs, tmp_path / "r.html")
    page = out.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched
    assert page.count("data:image/png;base64,") == 1 + 2 * 2  # overlaid curves; per run: curves + confusion matrix
    assert "id='comparison'" in page and "classify-lora" in page and "classify-full" in page
    for path in zh_runs:
        run = read_run(path)
        assert f"{run.eval['accuracy']:.4f}" in page
        wrong = run.wrong
        assert f"{len(wrong):,} of {len(run.predictions):,} held-out rows" in page
        if wrong:  # a wrong prediction's review text is shown (HTML-escaped)
            from html import escape
            assert escape(run.wrong_sample()[0]["text"][:60]) in page
    assert "好评" in page and "rows read" in page and "training seconds" in page
    one = write_report(zh_runs[:1])
    assert one == Path(zh_runs[0]) / "report.html" and "id='comparison'" not in one.read_text(encoding="utf-8")


def test_report_errors(tmp_path):
    from clmtune.report import write_report

    with pytest.raises(ClmtuneError, match="no such folder"):
        write_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClmtuneError, match="not a run folder"):
        write_report([tmp_path / "empty"])


@pytest.mark.slow
def test_report_cli(zh_runs, tmp_path, capsys):
    from clmtune.cli import main

    assert main(["report", str(zh_runs[0]), "--out", str(tmp_path / "cli.html")]) == 0
    assert (tmp_path / "cli.html").is_file() and "report written to" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.slow
@needs_chromium
def test_report_renders_in_headless_chromium(zh_runs, tmp_path, browser):
    from clmtune.report import write_report

    page_path = write_report(zh_runs, tmp_path / "report.html")
    requests = []
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.on("request", lambda r: requests.append(r.url))
    page.goto(page_path.as_uri())
    page.wait_for_load_state("load")
    assert page.locator("table#comparison").count() == 1
    assert page.locator("table#metrics-0 tr").count() >= 3  # header + accuracy + macro-F1 ...
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    assert len(images) == 5 and all(done and width > 0 for done, width in images)
    assert "好评" in page.inner_text("body")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert (tmp_path / "report.png").stat().st_size > 50_000
    json.dumps(images)  # keep for a failure message


def test_report_of_a_chat_run_shows_reply_scores_and_replies(tmp_path):
    """A run folder as a chat run leaves it (files written here, no training): loss curve, reply metrics, replies."""
    from clmtune.report import write_report

    run = tmp_path / "chat"
    run.mkdir()
    (run / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "learning_rate": 1e-3})
                                                 + "\n" for s in range(1, 6)) + '{"step": 5, "eval_loss": 2.5}\n'
                                         + '{"step": 6, "loss"', encoding="utf-8")  # a torn last line is skipped
    (run / "train_summary.json").write_text(json.dumps({"steps": 5, "final_loss": 0.6, "data": {"task": "chat"}}),
                                            encoding="utf-8")
    (run / "eval.json").write_text(json.dumps({"method": "perplexity+replies", "loss": 2.4, "perplexity": 11.0,
                                               "n": 2, "replies": {"rouge_l": 17.8, "bleu4": 3.1,
                                                                   "exact_match": 0.0}}), encoding="utf-8")
    with open(run / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "reference", "generated", "earlier_turns"])
        w.writerow(["你好", "你好！", "你好呀", "0"])
        w.writerow(["<b>梦想</b>", "环游世界", "吃饭", "1"])
    page = write_report([run]).read_text(encoding="utf-8")
    for text in ("reply ROUGE-L", "17.8", "held-out loss", "2.4000", "2 of 2 held-out prompts", "你好呀",
                 "&lt;b&gt;梦想&lt;/b&gt;"):
        assert text in page, text
    assert "<b>梦想" not in page  # texts are escaped
    assert page.count("data:image/png;base64,") == 1  # the curves (no confusion matrix for chat)
