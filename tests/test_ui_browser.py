"""`clmtune ui` as a person uses it (issue 30), in headless Chromium (Debian's `chromium`, driven by Playwright):
upload a Chinese CSV, check it (clmtune prepare), start a 5-step run, watch the curve fill and the run finish, open
its playground and classify a review, start a second run, compare the two. Screenshots are kept in the test's tmp
dir (ui-*.png); Chinese text must be drawn with a CJK font (Chromium says which fonts drew a node)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from browser import needs_chromium
from liveserver import LiveServer

pytestmark = [pytest.mark.slow, needs_chromium]
TOKEN = "browser-test-token"
GOOD = ["房间干净，服务热情，早餐丰富", "位置方便，前台很友好", "性价比高，下次还来", "床很舒服，环境安静"]
BAD = ["房间有异味，隔音太差", "服务态度恶劣，再也不来", "设施陈旧，卫生间漏水", "早餐难吃，价格太贵"]


def chinese_csv(path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "label"])
        for i in range(6):
            for text in GOOD:
                w.writerow([text + "！" * i, "好评"])
            for text in BAD:
                w.writerow([text + "。" * i, "差评"])
    return path


def fonts_of(page, selector: str) -> list[str]:
    """The fonts Chromium used to draw the text of the first node matching ``selector``."""
    cdp = page.context.new_cdp_session(page)
    root = cdp.send("DOM.getDocument")["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    used = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    cdp.detach()
    return [f["familyName"] for f in used]


def assert_cjk_font(page, selector: str) -> None:
    families = fonts_of(page, selector)
    assert any("CJK" in f or "Han" in f or "Hei" in f or "PingFang" in f for f in families), (selector, families)


def wait_run(page, name: str, status: str, timeout_s: float = 300) -> None:
    page.wait_for_selector(f'#runs tr[data-run="runs/{name}"][data-status="{status}"]', timeout=timeout_s * 1000)


def start_run(page, name: str, lr: str) -> None:
    page.fill("#name", name)
    page.fill("#lr", lr)
    page.click("#btn-yaml")
    page.wait_for_function(f"document.getElementById('yaml').value.includes('runs/{name}') || "
                           "document.getElementById('settings-error').textContent", timeout=120_000)
    assert page.inner_text("#settings-error") == "", page.inner_text("#settings-error")
    page.click("#btn-start")


def test_upload_train_watch_play_compare(browser, tmp_path, one_thread):
    from clmtune.ui.app import create_app

    ws = tmp_path / "ws"
    data = chinese_csv(tmp_path / "酒店评论.csv")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    app = create_app(ws, token=TOKEN)
    with LiveServer(app) as srv:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        assert page.goto(srv.url + "/").status == 401  # no token, no page
        page.goto(f"{srv.url}/?token={TOKEN}")
        page.wait_for_selector("body[data-ready=true]")

        # 1 data: upload the Chinese CSV, see its columns, what clmtune prepare says
        page.set_input_files("#file-input", str(data))
        page.wait_for_selector("#preview table.head")
        assert page.input_value("#file-select") == "uploads/酒店评论.csv"
        assert (ws / "uploads" / "酒店评论.csv").read_bytes() == data.read_bytes()
        assert page.input_value("#text-column") == "review" and page.input_value("#label-column") == "label"
        assert "房间干净" in page.inner_text("#preview")
        assert_cjk_font(page, "#preview table.head tbody td")

        # 2 settings
        page.fill("#template", "评论：{review} 评价：")
        page.fill("#model", "builtin:gpt2-zh-small")
        page.fill("#max-train-rows", "16")
        page.fill("#max-eval-rows", "8")
        page.fill("#batch-size", "4")
        page.fill("#max-steps", "5")
        page.click("#btn-check")
        page.wait_for_selector("#prepare-out .report", timeout=240_000)
        report = page.inner_text("#prepare-out")
        assert "train.learning_rate" in report and "auto" in report and "data.max_length" in report
        assert "好评" in report and "差评" in report  # label counts
        assert_cjk_font(page, "#prepare-out table.bars tbody td")
        page.screenshot(path=str(shots / "ui-data.png"), full_page=True)

        # 3 training: the curve fills as train_log.jsonl grows, the run finishes
        page.evaluate("""() => { window.pointsSeen = [];
            new MutationObserver(() => window.pointsSeen.push(+document.getElementById('chart').dataset.points))
              .observe(document.getElementById('chart'), {attributes: true, attributeFilter: ['data-points']}); }""")
        page.fill("#eval-steps", "2")  # held-out loss and accuracy every 2 steps: the second curve
        start_run(page, "酒店-a", "0.001")
        page.wait_for_function("document.getElementById('current-run').textContent === 'runs/酒店-a'",
                               timeout=120_000)
        page.wait_for_selector("#status.status-finished", timeout=300_000)
        page.wait_for_function("+document.getElementById('chart').dataset.points === 5", timeout=120_000)
        seen = page.evaluate("window.pointsSeen")
        assert seen[-1] == 5 and sorted(seen) == seen and 0 in seen  # redrawn from empty up to all five steps
        assert page.locator("#chart path.loss").count() == 1 and page.locator("#chart path.acc").count() == 1
        assert int(page.get_attribute("#chart", "data-eval-points")) >= 4  # eval_loss and eval_accuracy at 2, 4(, 5)
        assert (ws / "configs" / "酒店-a.yaml").is_file() and (ws / "runs" / "酒店-a" / "train_summary.json").is_file()
        wait_run(page, "酒店-a", "finished", 60)
        page.wait_for_function("""document.querySelector('#runs tr[data-run="runs/酒店-a"] td.eval')
                                  .textContent.includes('acc')""", timeout=120_000)  # evaluated after training
        page.screenshot(path=str(shots / "ui-train.png"), full_page=True)

        # 5 try it: the playground of the finished run classifies a review
        page.click('#runs tr[data-run="runs/酒店-a"] button[data-act=play]')
        page.wait_for_selector("#play-frame:not([hidden])", timeout=240_000)
        frame = page.frame_locator("#play-frame")
        frame.locator("body[data-ready=true]").wait_for(timeout=60_000)
        frame.locator("#tab-classify").click()
        review = "前台服务很热情，房间也很干净"
        frame.locator("#classify-input").fill(review)
        frame.locator("#classify-send").click()
        frame.locator(".bar").first.wait_for(timeout=60_000)
        shown = frame.locator("#classify-panel").inner_text()
        assert "好评" in shown and "差评" in shown
        answer = httpx.post(f"{srv.url}/v1/classify", json={"input": review}, headers={"X-Clmtune-Token": TOKEN},
                            timeout=60).json()  # the same model through the ui's API
        assert set(answer["data"][0]["probabilities"]) == {"好评", "差评"}
        assert answer["data"][0]["label"] in shown
        with httpx.stream("POST", f"{srv.url}/v1/completions", headers={"X-Clmtune-Token": TOKEN}, timeout=60,
                          json={"model": "酒店-a", "prompt": "这家酒店的房间", "max_tokens": 4, "stream": True,
                                "seed": 1}) as r:
            chunks = [ln for ln in r.iter_lines() if ln.startswith("data: ")]  # streamed through the ui server
        assert r.headers["content-type"].startswith("text/event-stream") and chunks[-1] == "data: [DONE]"
        assert len(chunks) >= 2 and json.loads(chunks[0][6:])["object"] == "text_completion"
        page.locator("#play-section").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "ui-playground.png"), full_page=True)

        # a run's config.yaml back into the form; a second run from it, then the comparison of the two
        page.click('#runs tr[data-run="runs/酒店-a"] button[data-act=load]')
        page.wait_for_function("document.getElementById('yaml').value.includes('id_column:')",  # the run's full YAML
                               timeout=120_000)
        assert "output_dir: runs/酒店-a" in page.input_value("#yaml")
        assert page.input_value("#name") == "酒店-a" and page.input_value("#template") == "评论：{review} 评价："
        assert page.input_value("#max-steps") == "5" and page.input_value("#file-select") == "uploads/酒店评论.csv"
        start_run(page, "酒店-b", "0.003")
        wait_run(page, "酒店-b", "finished")
        for name in ("酒店-a", "酒店-b"):
            page.check(f'#runs tr[data-run="runs/{name}"] input.cmp')
        page.click("#btn-compare")
        page.wait_for_selector("#compare-frame:not([hidden])", timeout=120_000)
        compare = page.frame_locator("#compare-frame")
        compare.locator("body").wait_for()
        text = compare.locator("body").inner_text()
        assert "酒店-a" in text and "酒店-b" in text
        page.screenshot(path=str(shots / "ui-compare.png"), full_page=True)
        page.evaluate("document.getElementById('train-section').scrollIntoView()")
        page.screenshot(path=str(shots / "ui.png"))  # one window: the curve, the queue, both runs
        page.close()
    if os.environ.get("CLMTUNE_UI_SCREENSHOT"):  # refresh docs/images/ui.png: CLMTUNE_UI_SCREENSHOT=docs/images/ui.png
        shutil.copy(shots / "ui.png", os.environ["CLMTUNE_UI_SCREENSHOT"])
    for name in ("ui-data.png", "ui-train.png", "ui-playground.png", "ui-compare.png", "ui.png"):
        assert (shots / name).stat().st_size > 20_000
