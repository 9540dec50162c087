"""`clmtune chat` driven through a pseudo-terminal, as a person types: streamed replies, /system, /history,
/reset, /exit, and the template saved by training."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest

from chatrun import REPO


def _spawn(args: list[str], home: str) -> pexpect.spawn:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "CLMTUNE_HOME": home,
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return pexpect.spawn(sys.executable, ["-m", "clmtune", *args], env=env, encoding="utf-8", timeout=120,
                         dimensions=(40, 200))


@pytest.mark.slow
def test_chat_session_through_a_terminal(chat_run):
    run, home = chat_run
    child = _spawn(["chat", "--run", str(run), "--max-new-tokens", "8", "--temperature", "0"], home)
    child.expect_exact("user> ")
    child.sendline("你是一个人工智能")  # a training conversation: the tiny model has learned its reply
    child.expect_exact("assistant> ")
    child.expect_exact("那是我的名字。\r\n")
    child.expect_exact("user> ")
    child.sendline("早上好，你好吗?")
    child.expect_exact("assistant> ")
    child.expect(r"(.*)\r\n")
    second = child.match.group(1).strip()
    child.expect_exact("user> ")
    child.sendline("/system 你是客服")
    child.expect_exact("(system prompt: 你是客服)")
    child.expect_exact("user> ")
    child.sendline("/history")
    child.expect_exact("system: 你是客服")
    child.expect_exact("user: 你是一个人工智能")
    child.expect_exact("assistant: 那是我的名字。")
    child.expect_exact("user: 早上好，你好吗?")
    child.expect_exact(f"assistant: {second}")
    child.expect_exact("(2 turns kept)")
    child.sendline("/reset")
    child.expect_exact("(history cleared)")
    child.sendline("/history")
    child.expect_exact("(0 turns kept)")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_chat_ctrl_d_and_model_without_template(chat_run, tmp_path):
    run, home = chat_run
    child = _spawn(["chat", "--run", str(run), "--max-new-tokens", "4", "--temperature", "0"], home)
    child.expect_exact("user> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    child = _spawn(["chat", "--model", "builtin:tiny-gpt2-zh"], home)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "no chat template" in child.before and "--chat-template" in child.before


@pytest.mark.slow
def test_generate_on_a_chat_run_uses_its_template(chat_run, capsys):
    from clmtune.cli import main

    run, _ = chat_run
    code = main(["generate", "--run", str(run), "你是一个人工智能", "--temperature", "0", "--max-new-tokens", "8",
                 "--json"])
    out = capsys.readouterr().out
    assert code == 0
    row = __import__("json").loads(out.strip().splitlines()[-1])
    assert row["prompt"] == "用户：你是一个人工智能\n助手：" and row["outputs"] == ["那是我的名字。"]
