"""Evaluation orchestration: load a run, ask its task which evaluation it gets, predict, score, write the report.

``labels`` tasks (classify): a label per example by ``rank`` or ``generate`` -> accuracy, macro-F1, confusion
matrix, or a RAFT submission for unlabelled examples. ``perplexity`` tasks (lm): token-weighted perplexity of
the held-out split, tokenized like training. ``replies`` tasks (sft, chat): that perplexity on the supervised
tokens, plus generated replies scored by character ROUGE-L, BLEU-4 and exact match.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
import time
from pathlib import Path
from typing import Sequence

from clmtune.config import EVAL_METHODS, RunConfig
from clmtune.data import Encoder, load_task, prepare_data, read_table, render_examples
from clmtune.data.sources import read_options
from clmtune.errors import ClmtuneError
from clmtune.fsutil import check_writable, is_writable
from clmtune.inference import for_inference, model_precision
from clmtune.models import is_prompt_learning
from clmtune.metrics import classification_metrics, perplexity
from clmtune.evaluate.predict import (label_tree_nodes, predict_constrained, predict_generate,
                                      resolve_method)
from clmtune.evaluate.preference import evaluate_preference_run
from clmtune.rank.predict import predict_rank
from clmtune.evaluate.replies import predict_replies, reply_metrics, write_replies
from clmtune.evaluate.report import write_label_report, write_result
from clmtune.run import RunDir
from clmtune.tasks import Task, get_task
from clmtune.tasks.examples import Example, TaskData

log = logging.getLogger("clmtune")


def evaluate_examples(model, tokenizer, cfg: RunConfig, examples: list[Example], labels: list[str],
                      method: str, out_dir: Path, progress: bool = True) -> dict:
    """Predict ``examples``; write ``eval.json``, ``predictions.csv`` and (labelled) the confusion matrix PNG into
    ``out_dir``; return what ``eval.json`` holds.

    Unlabelled examples give a RAFT submission: ``predictions.csv`` with columns ``ID,Label``.
    """
    if method not in EVAL_METHODS:
        raise ClmtuneError(f"eval method {method!r} is not one of {', '.join(EVAL_METHODS)}")
    if not examples:
        raise ClmtuneError("the split to evaluate is empty; check the data file")
    encoder = Encoder(tokenizer, cfg.data)
    asked, method = method, resolve_method(method, encoder, labels)
    if asked == "auto":
        log.info("eval.method auto: %s (label tree of %d nodes)", method, label_tree_nodes(encoder, labels))
    if method == "constrained" and is_prompt_learning(model):
        log.info("eval: constrained decoding does not drive peft prompt-learning models; using rank")
        method = "rank"
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    if method == "rank":
        preds = predict_rank(model, encoder, examples, labels, cfg.eval.batch_size, cfg.eval.normalize_by_length,
                             progress)
    elif method == "constrained":
        preds = predict_constrained(model, encoder, examples, labels, cfg.eval.batch_size, progress)
    else:
        preds = predict_generate(model, encoder, examples, labels, cfg.eval.batch_size, progress,
                                 cfg.eval.map_invalid)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    if preds.truncated:
        log.warning("eval: %d of %d prompts were cut to fit data.max_length=%d with the longest label + end token "
                    "(the same count for rank and generate; training counts each row with its own label)",
                    preds.truncated, len(examples), cfg.data.max_length)
    result = {"method": method, **({"method_asked": asked} if asked != method else {}), "n": len(examples),
              "invalid": preds.invalid, "seconds": round(seconds, 3),
              "examples_per_s": round(len(examples) / max(seconds, 1e-9), 2), "truncated_prompts": preds.truncated,
              "precision": model_precision(model)}
    if method == "rank":
        result["normalize_by_length"] = cfg.eval.normalize_by_length
    if all(e.label is not None for e in examples):
        gold = [e.label for e in examples]
        result.update(classification_metrics(gold, preds.predicted, labels))
        if preds.mapped is not None:
            result["mapped_to_nearest_label"] = classification_metrics(gold, preds.mapped, labels)
    return write_label_report(result, out_dir, examples, preds.predicted, preds.mapped, method == "generate",
                              labels, cfg)


def evaluate_lm(model, features: Sequence[dict[str, list[int]]], pad_id: int, out_dir: Path, batch_size: int = 8,
                progress: bool = True) -> dict:
    """Perplexity of a held-out split of tokenized features, written to ``out_dir/eval.json``."""
    t0 = time.perf_counter()
    result = {"method": "perplexity", **perplexity(model, features, pad_id, batch_size, progress)}
    seconds = time.perf_counter() - t0
    result.update(seconds=round(seconds, 3), examples_per_s=round(len(features) / max(seconds, 1e-9), 2))
    return write_result(result, out_dir)


def evaluate_run(run_dir: str | Path, split: str = "eval", data_file: str | None = None, method: str | None = None,
                 out_dir: str | Path | None = None, progress: bool = True, device: str | None = None,
                 dtype: str | None = None, data_reading: dict | None = None,
                 data: TaskData | None = None) -> tuple[dict, Path]:
    """Evaluate a trained run on its held-out split (``eval``), its unlabelled ``test`` split, or ``data_file``.

    Returns (metrics, folder written to). Each evaluation has its own folder (``RunDir.eval_output_dir``:
    ``RUN/eval/<split or file-stem>-<method>/``) unless ``out_dir`` names one; ``RUN/eval.json`` is the latest
    evaluation and ``RUN/eval/index.json`` lists them all. ``device``/``dtype``: override the run's ``eval.device``/``eval.dtype``.
    ``data_reading``: how to read ``data_file`` where it differs from the run's data (``encoding``, ``delimiter``).
    ``data``: the run's examples when the caller has them (the evaluation right after training): its splits are
    not read again. The task is looked up here, once, and handed to everything below.
    """
    run = RunDir(run_dir)
    cfg = run.load_config()
    if data_reading:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_reading))
    run.check_finished("evaluate")
    if out_dir is not None:
        check_writable(out_dir, "--out")
    elif not is_writable(run.path):  # before minutes of evaluating, not after
        raise ClmtuneError(f"cannot write to the run folder {run.path} (read-only); pass --out DIR to write the "
                           "evaluation elsewhere")
    shape = data.shape if data is not None and data.shape is not None else get_task(cfg.data.task)
    if method is not None and shape.evaluation != "labels":
        scored_by = SCORED_BY.get(shape.evaluation, "its own measure")
        raise ClmtuneError(f"--method {method}: a {cfg.data.task} run is scored by {scored_by}, not by predicting "
                           "labels; drop --method")
    if data_file is None and split not in shape.eval_splits:
        raise ClmtuneError(f"--split {split!r} is not one of {', '.join(shape.eval_splits)} for a {cfg.data.task} "
                           "run; pick one of them or pass --data FILE")
    model, tokenizer = run.load_model(device=device or cfg.eval.device, cfg=cfg)
    if shape.evaluation not in REFERENCE_EVALUATIONS:
        model, precision, why = for_inference(model, dtype or cfg.eval.dtype)
        log.info("eval in %s (%s)", precision, why)
    if shape.evaluation == "preference":  # reads its pairs itself
        return evaluate_preference_run(run, model, tokenizer, cfg, split, data_file, out_dir, progress, method)
    target = EvalTarget(shape, split, data_file, data if data_file is None else None)
    return EVALUATORS[shape.evaluation](run, model, tokenizer, cfg, target, out_dir, progress, method)


@dataclass(frozen=True)
class EvalTarget:
    """What an evaluation scores: the run's ``split`` or every row of ``data_file``, read for ``shape``;
    ``data``: the run's examples when the caller already has them."""

    shape: Task
    split: str
    data_file: str | None
    data: TaskData | None = None


def _evaluate_labels_run(run: RunDir, model, tokenizer, cfg: RunConfig, target: EvalTarget,
                         out_dir: str | Path | None, progress: bool, method: str | None) -> tuple[dict, Path]:
    """A label per example of the held-out split, the ``test`` split or ``data_file``."""
    labels = run.labels()
    split, data_file = target.split, target.data_file
    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise ClmtuneError(f"--data {data_file!r}: no such file; give the path of a data file")
        rows = read_table(path, read_options(cfg.data))  # as in training
        labelled = bool(rows) and cfg.data.label_column in rows[0]
        examples, _ = render_examples(rows, cfg.data, labels, str(path), labelled, target.shape)
    else:
        task = target.data or load_task(cfg.data, target.shape)
        examples = task.eval if split == "eval" else task.test
        if not examples:
            raise ClmtuneError(f"the run's {split!r} split is empty" + (
                "; set data.eval_fraction > 0 or pass --data FILE" if split == "eval" else
                "; set data.test_file or pass --data FILE"))
    method = method or cfg.eval.method
    # the folder names what runs, not "auto"
    chosen = resolve_method(method, Encoder(tokenizer, cfg.data, target.shape), labels)
    if chosen == "constrained" and is_prompt_learning(model):
        chosen = "rank"
    out = Path(out_dir) if out_dir else run.eval_output_dir(split, data_file, chosen)
    result = evaluate_examples(model, tokenizer, cfg, examples, labels, method, out, progress)
    run.record_evaluation(out, result, split, data_file)
    return result, out


def _held_out(tokenizer, cfg: RunConfig, target: EvalTarget):
    """(tokenized features, their examples or None, the data settings) of what a perplexity/replies evaluation
    scores: the run's ``eval`` split or ``target.data_file`` (every row of it). The source is read once and only
    that split is tokenized; a run trained from a ``data.prepared`` folder has its eval features there (examples:
    read on demand)."""
    data_file = target.data_file
    if data_file is not None:
        if not Path(data_file).is_file():
            raise ClmtuneError(f"--data {data_file!r}: no such file; give the path of a data file")
        data_cfg = dataclasses.replace(cfg.data, source=str(data_file), eval_file=None, test_file=None,
                                       eval_fraction=0.0, prepared=None)
        name = "train"
    else:
        data_cfg, name = cfg.data, "eval"
    prep = prepare_data(tokenizer, data_cfg, task=target.data, splits=(name,), shape=target.shape)
    features = getattr(prep, name)
    if data_file is None and (features is None or len(features) == 0):
        raise ClmtuneError("the run's 'eval' split is empty; set data.eval_fraction > 0 or pass --data FILE")
    return features, (getattr(prep.examples, name) if prep.examples is not None else None), data_cfg


def _perplexity(model, tokenizer, cfg: RunConfig, features, progress: bool) -> dict:
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(features["input_ids"], features["labels"])]
    t0 = time.perf_counter()
    result = {"method": "perplexity", **perplexity(model, rows, tokenizer.pad_token_id, cfg.eval.batch_size,
                                                   progress)}
    seconds = time.perf_counter() - t0
    return {**result, "seconds": round(seconds, 3), "examples_per_s": round(len(rows) / max(seconds, 1e-9), 2)}


def _evaluate_lm_run(run: RunDir, model, tokenizer, cfg: RunConfig, target: EvalTarget,
                     out_dir: str | Path | None, progress: bool, method: str | None = None) -> tuple[dict, Path]:
    """Perplexity of an ``lm`` run on its held-out split or on ``data_file`` (tokenized like training)."""
    data_file = target.data_file
    features, _, _ = _held_out(tokenizer, cfg, target)
    out = Path(out_dir) if out_dir else run.eval_output_dir("eval", data_file, method or "perplexity")
    result = write_result(_perplexity(model, tokenizer, cfg, features, progress), out)
    run.record_evaluation(out, result, "eval", data_file)
    return result, out


def _evaluate_replies_run(run: RunDir, model, tokenizer, cfg: RunConfig, target: EvalTarget,
                          out_dir: str | Path | None, progress: bool, method: str | None = None) -> tuple[dict, Path]:
    """Chat and sft runs: the perplexity of the held-out split on the supervised (assistant / response) tokens,
    then greedy replies to its prompts scored against the references; ``predictions.jsonl``/``.csv`` keep them.
    ``eval.json`` is written once, with both."""
    data_file = target.data_file
    features, examples, data_cfg = _held_out(tokenizer, cfg, target)
    result = _perplexity(model, tokenizer, cfg, features, progress)
    out = Path(out_dir) if out_dir else run.eval_output_dir("eval", data_file, method or "replies")
    if examples is None:  # splits from a data.prepared folder: the rows are read here
        task = load_task(data_cfg, target.shape)
        examples = task.train if data_file is not None else task.eval
    t0 = time.perf_counter()
    replies = predict_replies(model, tokenizer, examples, target.shape.nested_rows,
                              cfg.generate.max_new_tokens, Encoder(tokenizer, cfg.data, target.shape).end_id,
                              cfg.generate.repetition_penalty, cfg.eval.batch_size, progress)
    write_replies(replies, out)
    result = {**result, "method": "perplexity+replies", "loss": result["nll_per_token"],
              "replies": {**reply_metrics(replies), "decoding": "greedy",
                          "max_new_tokens": cfg.generate.max_new_tokens,
                          "repetition_penalty": cfg.generate.repetition_penalty,
                          "seconds": round(time.perf_counter() - t0, 3)}}
    result = write_result(result, out)
    run.record_evaluation(out, result, "eval", data_file)
    return result, out


EVALUATORS = {"labels": _evaluate_labels_run, "perplexity": _evaluate_lm_run, "replies": _evaluate_replies_run}
"""``Task.evaluation`` -> the function that evaluates a run of that task (``preference`` runs:
``evaluate_preference_run``, which reads its pairs itself)."""
SCORED_BY = {"perplexity": "perplexity", "replies": "perplexity and its replies",
             "preference": "reward accuracy on its held-out pairs"}
"""What a run that does not predict labels is scored by, for the refusal of ``--method``."""
REFERENCE_EVALUATIONS = ("preference",)
"""Evaluations that switch the adapter off for a reference: the model stays fp32 and unmerged."""
