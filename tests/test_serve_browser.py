"""The playground page in a real browser (issue 15): headless Chromium (Debian's `chromium`, driven by Playwright)
opens `/`, sends a Chinese message, waits for the streamed reply and checks it in the DOM against the API's answer;
for a classification run it shows per-label probability bars; on a model without a chat template the Chat tab is
shown but disabled and a completion comes back as a reply bubble. Screenshots are kept in the test's tmp dir."""

from __future__ import annotations


import openai
import pytest
import torch

from browser import needs_chromium
from liveserver import CHAT_TEMPLATE, LiveServer

pytestmark = needs_chromium


def watch(page) -> dict:
    """What the page asked the server for: request bodies by path, and every answer >= 400 (a missing favicon
    would be one) and console error."""
    seen = {"posts": [], "failed": [], "console": []}
    page.on("request", lambda r: r.method == "POST" and seen["posts"].append((r.url, r.post_data_json)))
    page.on("response", lambda r: r.status >= 400 and seen["failed"].append((r.status, r.url)))
    page.on("console", lambda m: m.type == "error" and seen["console"].append(m.text))
    return seen


def assert_icon_renders(page) -> None:
    """The page names its icon inline (no /favicon.ico request to 404) and the browser can decode it."""
    href = page.get_attribute("link[rel=icon]", "href")
    assert href.startswith("data:image/svg+xml,")
    width = page.evaluate("""async (src) => { const img = new Image(); img.src = src; await img.decode();
                                              return img.naturalWidth; }""", href)
    assert width > 0


def test_chat_streams_into_the_page(browser, tmp_path, one_thread):
    from clmtune.serve.app import create_app
    from clmtune.serve.engine import Engine

    engine = Engine.load(model="builtin:tiny-gpt2-zh", device="cpu")
    engine.tokenizer.chat_template = CHAT_TEMPLATE
    with LiveServer(create_app(engine)) as srv:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        seen = watch(page)
        page.goto(srv.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        assert "builtin:tiny-gpt2-zh" in page.inner_text("#model-info")
        assert page.is_enabled("#tab-chat") and not page.is_visible("#chat-note")
        system = "你是一位酒店前台，回答要简短"
        page.fill("#system", system)
        page.fill("#max-tokens", "24")
        page.fill("#temperature", "0.9")
        page.fill("#seed", "7")
        message = "你好，请介绍一下这家酒店的早餐"
        page.fill("#input", message)
        page.evaluate("""() => { window.updates = 0;
            new MutationObserver(() => window.updates++).observe(document.getElementById('messages'),
                {subtree: true, childList: true, characterData: true}); }""")
        page.click("#send")
        reply = page.wait_for_selector(".msg.assistant[data-done=true]", timeout=60_000)
        shown = reply.inner_text()
        page.screenshot(path=str(tmp_path / "playground-chat.png"), full_page=True)
        updates = page.evaluate("window.updates")
        assert page.inner_text(".msg.user") == message
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": message}]
        assert [body["messages"] for url, body in seen["posts"]] == [messages]  # the system prompt went first
        expected = client.chat.completions.create(model="builtin:tiny-gpt2-zh", max_tokens=24, temperature=0.9,
                                                  seed=7, messages=messages)
        assert shown.strip() == expected.choices[0].message.content.strip() != ""
        assert updates > 4  # the reply grew piece by piece (streamed), not in one write
        assert reply.get_attribute("data-finish") == expected.choices[0].finish_reason
        assert_icon_renders(page)
        assert seen["failed"] == [] and seen["console"] == []
        page.close()
    assert (tmp_path / "playground-chat.png").stat().st_size > 10_000


def test_classification_bars(browser, trained, tmp_path, one_thread):
    from clmtune.serve.app import create_app
    from clmtune.serve.engine import Engine

    _, result = trained
    engine = Engine.load(run=str(result.output_dir), device="cpu")
    with LiveServer(create_app(engine)) as srv:
        page = browser.new_page(viewport={"width": 1000, "height": 600})
        page.goto(srv.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        assert page.is_visible("#classify-panel") and page.is_visible("#tab-classify")
        page.fill("#classify-input", "@united lost my bag again 行李又丢了")
        page.click("#classify-send")
        page.wait_for_selector(".bar")
        bars = page.query_selector_all(".bar")
        probs = {b.get_attribute("data-label"): float(b.get_attribute("data-p")) for b in bars}
        page.screenshot(path=str(tmp_path / "playground-classify.png"), full_page=True)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        expected = client.post("/classify", body={"input": ["@united lost my bag again 行李又丢了"]},
                               cast_to=object)["data"][0]
        assert probs == pytest.approx(expected["probabilities"], abs=1e-9)
        assert page.inner_text("#verdict") == "→ " + expected["label"]
        widths = [b.query_selector(".fill").evaluate("e => e.getBoundingClientRect().width") for b in bars]
        assert widths[0] >= widths[-1] and widths[0] > 0
        page.close()


@pytest.mark.slow
def test_no_chat_template_disables_chat_and_completion_is_a_bubble(browser, tmp_path, one_thread):
    from clmtune.serve.app import create_app
    from clmtune.serve.engine import Engine

    engine = Engine.load(model="builtin:tiny-gpt2-zh", device="cpu")
    engine.tokenizer.chat_template = None
    with LiveServer(create_app(engine)) as srv:
        assert srv.health()["chat"] is False
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        seen = watch(page)
        page.goto(srv.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        # the tab is there, disabled, with its reason on one line; the page opens on Completion instead
        assert page.is_visible("#tab-chat") and page.is_disabled("#tab-chat")
        assert "no chat template" in page.inner_text("#chat-note") and page.is_visible("#chat-note")
        assert "on" in page.get_attribute("#tab-completion", "class") and not page.is_visible("#system")
        page.click("#tab-chat", force=True)  # a click on the disabled tab changes nothing
        assert "on" not in page.get_attribute("#tab-chat", "class")
        prompt = "这家酒店的早餐"
        page.fill("#max-tokens", "16")
        page.fill("#seed", "3")
        page.fill("#input", prompt)
        page.click("#send")
        bubble = page.wait_for_selector(".msg.assistant.completion[data-done=true]", timeout=60_000)
        page.screenshot(path=str(tmp_path / "playground-completion.png"), full_page=True)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        expected = client.completions.create(model="builtin:tiny-gpt2-zh", prompt=prompt, max_tokens=16,
                                             temperature=0.8, top_p=1, seed=3)
        assert [url.rsplit("/", 2)[-2:] for url, _ in seen["posts"]] == [["v1", "completions"]]
        assert bubble.query_selector(".prompt").inner_text() == prompt
        assert bubble.query_selector(".reply").inner_text() == expected.choices[0].text != ""
        # styled as the chat replies are: the assistant bubble's background and rounded corners, left-aligned
        style = bubble.evaluate("""e => { const s = getComputedStyle(e);
            return [s.backgroundColor, s.borderTopLeftRadius, s.alignSelf]; }""")
        assert style == ["rgb(241, 243, 245)", "8px", "flex-start"]
        assert page.query_selector_all(".msg.user") == []  # one bubble per completion, the prompt inside it
        assert_icon_renders(page)
        assert seen["failed"] == [] and seen["console"] == []
        page.close()
    assert (tmp_path / "playground-completion.png").stat().st_size > 10_000
