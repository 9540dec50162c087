"""The preference losses equal TRL's on the same batch and weights (fp32, 1e-5): DPO and IPO through
``DPOTrainer`` (its data collator and ``_compute_loss``), ORPO through ``ORPOTrainer.get_batch_loss_metrics`` and
SimPO through ``CPOTrainer`` (``loss_type="simpo"``, ``cpo_alpha=0``).

clmtune's side is its own pipeline end to end: the ``preference`` task's encoding, the left-padded pair batch with
position ids, the LM head on the response positions only, ``pair_losses``. TRL's side is right-padded (DPO: flushed
left) and computes full logits, in fp32 (``bf16=False``: TRL's configs otherwise run the reference model under
bf16 autocast on a CPU that has bf16). Without TRL (the ``bench`` extra) the test checks the committed numbers TRL gave
(``tests/fixtures/preference_trl.json``, written by ``python tests/test_preference_trl.py``).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from clmtune.config import DataConfig, ModelConfig, PreferenceConfig
from clmtune.data import prepare_data
from clmtune.models import load_model, load_tokenizer
from clmtune.tasks.preference_loss import METRIC_NAMES, forward_scores, pair_losses
from clmtune.train.preference import PairCollator

FIXTURE = Path(__file__).parent / "fixtures" / "preference_trl.json"
PAIRS = [
    {"prompt": "Review of the hotel:", "chosen": " Clean rooms and a friendly staff.",
     "rejected": " Dirty, noisy and the breakfast was cold."},
    {"prompt": "Write a short reply to a guest who liked the spa and asked about parking:",
     "chosen": " Thank you! Parking is free.", "rejected": " No."},
    {"prompt": "Q: Is the pool open in winter?", "chosen": " Yes, it is heated and open all year round.",
     "rejected": " I do not know what a pool is, sorry about that, please ask somebody else."},
    {"prompt": "Describe the view:", "chosen": " The sea.", "rejected": " A wall."},
]
SETTINGS = {"dpo": dict(beta=0.1), "ipo": dict(beta=0.5), "orpo": dict(lambda_=0.2), "simpo": dict(beta=2.0, gamma=0.6,
                                                                                                label_smoothing=0.1)}


def models():
    """The reference (tiny OPT, seeded) and the policy: the same weights moved by seeded noise, so that the
    rewards are not zero."""
    ref = load_model(ModelConfig("builtin:tiny-opt")).eval()
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return policy.eval(), ref


def encoded(tmp_path: Path):
    tok = load_tokenizer(ModelConfig("builtin:tiny-opt"))
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    prep = prepare_data(tok, DataConfig(task="preference", source=str(src), eval_fraction=0.0, max_length=64))
    return tok, prep


def clmtune_numbers(loss: str, policy, ref, prep) -> dict[str, float]:
    feats = [dict(prep.train[i], row=i) for i in range(len(prep.train))]
    batch = PairCollator(prep.pad_id, None)(feats)
    batch.pop("rows")
    p = PreferenceConfig(loss=loss, **SETTINGS[loss])
    with torch.no_grad():
        ref_logps = forward_scores(ref, batch).logps if loss in ("dpo", "ipo") else None
        scores = forward_scores(policy, batch, with_nll=loss == "orpo", head_mask=True)
        losses, metrics = pair_losses(loss, scores, ref_logps, p.beta, p.label_smoothing, p.lambda_, p.gamma)
    return {"loss": float(losses.mean()), **{k: float(v.mean()) for k, v in metrics.items()}}


def trl_numbers(loss: str, policy, ref, tok, prep, tmp_path: Path) -> dict[str, float]:
    import datasets

    s = SETTINGS[loss]
    ds = datasets.Dataset.from_list(PAIRS)
    out = str(tmp_path / f"trl-{loss}")
    # the same token ids as clmtune's encoding: prompt (with the BOS), response + EOS
    rows = [{"prompt_ids": [i for i, m in zip(ids, lab) if m == -100],
             "chosen_ids": [i for i, m in zip(ids, lab) if m != -100],
             "rejected_ids": [i for i, m in zip(r_ids, r_lab) if m != -100]}
            for ids, lab, r_ids, r_lab in zip(prep.train["input_ids"], prep.train["labels"],
                                               prep.train["rejected_input_ids"], prep.train["rejected_labels"])]
    if loss in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=out, beta=s["beta"], loss_type=["sigmoid" if loss == "dpo" else "ipo"],
                         report_to="none", use_cpu=True, disable_dropout=True, bf16=False)
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
        # TRL's own tokenization of the rows gives the same ids as clmtune's
        assert [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in trainer.train_dataset] == rows
        inputs = trainer.data_collator(rows)
        trainer.model.eval()
        with torch.no_grad():
            value = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        m = trainer._metrics["eval"]
        return {"loss": float(value), **{k: float(m[k][-1]) for k in METRIC_NAMES}}
    # ORPO / SimPO: TRL's batch format (right-padded, prompt labels -100), from the same ids
    batch = {}
    for side in ("chosen", "rejected"):
        seqs = [r["prompt_ids"] + r[f"{side}_ids"] for r in rows]
        labels = [[-100] * len(r["prompt_ids"]) + r[f"{side}_ids"] for r in rows]
        n = max(map(len, seqs))
        batch[f"{side}_input_ids"] = torch.tensor([x + [tok.pad_token_id] * (n - len(x)) for x in seqs])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in seqs])
        batch[f"{side}_labels"] = torch.tensor([x + [-100] * (n - len(x)) for x in labels])
    if loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(output_dir=out, beta=s["lambda_"], report_to="none", use_cpu=True, disable_dropout=True,
                          bf16=False)
        trainer = ORPOTrainer(model=policy, args=args, train_dataset=ds, processing_class=tok)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(output_dir=out, loss_type="simpo", cpo_alpha=0.0, beta=s["beta"], simpo_gamma=s["gamma"],
                         label_smoothing=s["label_smoothing"], report_to="none", use_cpu=True, disable_dropout=True,
                        bf16=False)
        trainer = CPOTrainer(model=policy, args=args, train_dataset=ds, processing_class=tok)
    trainer.model.eval()
    with torch.no_grad():
        value, metrics = trainer.get_batch_loss_metrics(trainer.model, batch, "train")
    return {"loss": float(value), **{k: float(metrics[k]) for k in METRIC_NAMES}}


@pytest.mark.parametrize("loss", list(SETTINGS))
def test_losses_and_rewards_equal_trl(loss, tmp_path, one_thread):
    tok, prep = encoded(tmp_path)
    policy, ref = models()
    ours = clmtune_numbers(loss, policy, ref, prep)
    try:
        import trl  # noqa: F401
    except ImportError:  # without the bench extra: the numbers TRL gave, committed
        theirs = json.loads(FIXTURE.read_text(encoding="utf-8"))[loss]
    else:
        theirs = trl_numbers(loss, policy, ref, tok, prep, tmp_path)
        fixed = json.loads(FIXTURE.read_text(encoding="utf-8"))[loss] if FIXTURE.exists() else theirs
        assert fixed == pytest.approx(theirs, abs=1e-5)  # the committed fixture is still what TRL gives
    assert ours == pytest.approx(theirs, abs=1e-5, rel=0)
    assert abs(ours["rewards/margins"]) > 1e-3  # a test that cannot fail with zero rewards is no test


if __name__ == "__main__":  # regenerate the fixture from the installed TRL
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok_, prep_ = encoded(Path(d))
        numbers = {k: trl_numbers(k, *models(), tok_, prep_, Path(d)) for k in SETTINGS}
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(numbers, indent=2), file=sys.stderr)
