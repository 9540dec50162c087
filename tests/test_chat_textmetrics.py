"""Character ROUGE-L, BLEU-4 and exact match against hand computations."""

from __future__ import annotations

import math

import pytest

from clmtune.textmetrics import bleu4, exact_match, rouge_l, score_texts


def test_bleu4_by_hand():
    # prediction 我喜欢吃苹果 (6 chars), reference 我爱吃苹果 (5 chars)
    # 1-grams: 我 吃 苹 果 match -> 4/6; 2-grams: 吃苹 苹果 -> 2/5; 3-grams: 吃苹果 -> 1/4;
    # 4-grams: none of 3 -> smoothing method 3: 1/(2^1 * 3) = 1/6; prediction longer -> no brevity penalty
    expected = (4 / 6 * 2 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert bleu4("我喜欢吃苹果", "我爱吃苹果") == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.3246679, abs=1e-7)
    # shorter prediction: 苹果 vs 我爱吃苹果: p1 = 2/2, p2 = 1/1, p3 = 0/max(1,0) -> 1/(2*1), p4 -> 1/(4*1)
    # brevity penalty exp(1 - 5/2)
    expected = math.exp(1 - 5 / 2) * (1 * 1 * 1 / 2 * 1 / 4) ** 0.25
    assert bleu4("苹果", "我爱吃苹果") == pytest.approx(expected, abs=1e-12)
    assert bleu4("今天天气很好", "今天天气很好") == pytest.approx(1.0)
    assert bleu4("你好", "再见") == 0.0  # no character in common
    assert bleu4("", "再见") == 0.0


def test_rouge_l_by_hand():
    # LCS(我喜欢吃苹果, 我爱吃苹果) = 我吃苹果 = 4; P = 4/6, R = 4/5; F = 2PR/(P+R) = 16/22
    assert rouge_l("我喜欢吃苹果", "我爱吃苹果") == pytest.approx(16 / 22, abs=1e-12)
    # whitespace is not a token: "a b c" vs "abd": LCS ab = 2, P = 2/3, R = 2/3
    assert rouge_l("a b c", "abd") == pytest.approx(2 / 3)
    assert rouge_l("你好", "再见") == 0.0
    assert rouge_l(" ", "再见") == 0.0


def test_exact_match_and_mean_scores():
    assert exact_match(" 三点 ", "三点") == 1.0 and exact_match("三点。", "三点") == 0.0
    got = score_texts(["我喜欢吃苹果", "三点"], ["我爱吃苹果", "三点"])
    # 三点 vs 三点: p1 = p2 = 1, no 3- or 4-grams -> 1/2 and 1/4 (as NLTK: short replies never reach 100)
    assert bleu4("三点", "三点") == pytest.approx((1 / 2 * 1 / 4) ** 0.25)
    assert got == {"rouge_l": round(100 * (16 / 22 + 1) / 2, 4),
                   "bleu4": round(100 * ((4 / 6 * 2 / 5 * 1 / 4 * 1 / 6) ** 0.25 + (1 / 8) ** 0.25) / 2, 4),
                   "exact_match": 50.0, "n": 2}
    assert score_texts([], [])["n"] == 0
    with pytest.raises(ValueError):
        score_texts(["a"], [])
