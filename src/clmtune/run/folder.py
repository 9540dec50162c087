"""``RunDir``: one run folder, its paths, whether it finished, loading what it holds and writing into it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from clmtune.config import RunConfig, load_config
from clmtune.errors import ClmtuneError
from clmtune.fsutil import FolderLock, clean_stale_tmp, is_writable, os_errors, tmp_sibling
from clmtune.run.files import (ADAPTER, BEST, CHECKPOINTS, CONFIG, CONFUSION_PNG, EVAL_INDEX, EVAL_JSON, EVALS,
                               LOSS_PNG, MODEL, PREDICTIONS_CSV, PREDICTIONS_JSONL, REPORT_HTML, SUMMARY, TENSORBOARD,
                               TOKENIZER, TRAIN_LOG, write_json_atomic, write_text_atomic)
from clmtune.metrics import METRICS

log = logging.getLogger("clmtune")

_ADAPTER_MARK = "adapter_config.json"  # written by peft's save_pretrained
_MODEL_MARK = "config.json"  # written by transformers' save_pretrained


class RunDir:
    """One run folder: its paths, whether it finished, and loading what it holds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- paths -----------------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def log_file(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def loss_png(self) -> Path:
        return self.path / LOSS_PNG

    @property
    def report_html(self) -> Path:
        return self.path / REPORT_HTML

    def weights(self, is_peft: bool) -> Path:
        """Where the trained weights go: ``adapter/`` for adapter methods, ``model/`` for full fine-tuning."""
        return self.adapter if is_peft else self.model

    def eval_output_dir(self, split: str = "eval", data_file: str | Path | None = None,
                        method: str = "rank") -> Path:
        """Default folder of an evaluation's files, one per (split or data file, method), so evaluating again
        another way never overwrites the first: ``RUN/eval/eval-rank``, ``RUN/eval/test-generate``,
        ``RUN/eval/file-<stem>-rank`` (``clmtune eval --data <stem>.csv``), ``RUN/eval/eval-perplexity``."""
        what = f"file-{Path(data_file).stem}" if data_file is not None else split
        return self.path / EVALS / f"{what}-{method}"

    @property
    def eval_index(self) -> Path:
        return self.path / EVALS / EVAL_INDEX

    def record_evaluation(self, folder: Path, result: dict, split: str, data_file: str | Path | None) -> None:
        """After an evaluation wrote its files into ``folder``: ``RUN/eval.json`` becomes its results (the latest
        evaluation, with ``folder``), and ``RUN/eval/index.json`` lists it with every earlier one."""
        import time

        if not is_writable(self.path):  # a read-only run evaluated with --out elsewhere: nothing else is written
            log.warning("%s is read-only: this evaluation (in %s) is not listed in its %s/%s", self.path, folder,
                        EVALS, EVAL_INDEX)
            return
        folder = Path(folder).resolve()
        where = str(folder.relative_to(self.path.resolve())) if folder.is_relative_to(self.path.resolve()) \
            else str(folder)
        write_json_atomic(self.path / EVAL_JSON, {**result, "folder": where})
        index = json.loads(self.eval_index.read_text(encoding="utf-8")) if self.eval_index.is_file() else {}
        headline = {k: result[k] for k in (*METRICS, "invalid", "n", "truncated_prompts") if k in result}
        index[where] = {"split": None if data_file is not None else split,
                        "data_file": None if data_file is None else str(data_file), "method": result.get("method"),
                        **headline, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(self.eval_index, index)

    # -- state -----------------------------------------------------------------------------------------------
    @staticmethod
    def is_run(path: str | Path) -> bool:
        """A finished run folder: its config plus trained weights, adapter or full model."""
        run = RunDir(path)
        return run.config_file.is_file() and run.is_finished()

    def has_adapter(self) -> bool:
        return (self.adapter / _ADAPTER_MARK).is_file()

    def has_full_model(self) -> bool:
        return (self.model / _MODEL_MARK).is_file()

    def has_weights(self) -> bool:
        """Trained weights are in place (renamed in complete), finished or not."""
        return self.has_adapter() or self.has_full_model()

    def is_finished(self) -> bool:
        """Training finished: ``train_summary.json``, written last (atomically), is the marker, next to complete
        weights. Weights without the summary are a run killed while saving: ``--resume`` finishes it."""
        return self.has_weights() and self.summary_file.is_file()

    def check_finished(self, what: str = "evaluate") -> None:
        """One line saying why this folder cannot be used as a finished run."""
        if not self.config_file.is_file():
            raise ClmtuneError(f"{self.path} is not a clmtune run folder (no {CONFIG}); give the output_dir of "
                               "`clmtune train`")
        if not self.is_finished():
            holder = FolderLock(self.path).live_holder()
            if holder is not None:
                who = (f"pid {holder['pid']} (`{holder.get('command')}`, since {holder.get('started')})"
                       if holder.get("pid") else "another clmtune process")
                raise ClmtuneError(f"cannot {what} {self.path}: it is being trained now by {who}; wait until it "
                                   "finishes")
            state = ("its weights are saved but training did not finish writing (killed while saving?); "
                     "`clmtune train --config {cfg} --resume` finishes it" if self.has_weights() else
                     "training did not finish (no trained weights); continue it with `clmtune train --config {cfg} "
                     "--resume` (needs checkpoints) or train again")
            raise ClmtuneError(f"cannot {what} {self.path}: " + state.format(cfg=self.config_file))
        if not self.tokenizer.is_dir():
            raise ClmtuneError(f"{self.path} has no {TOKENIZER}/ folder (the run's tokenizer); copy the whole run "
                               "folder, or train again")

    def eval_files(self) -> list[Path]:
        """Outputs of earlier evaluations: the ``eval/`` folders with their index, the latest ``eval.json``, and the
        files and ``test``/``eval-*`` folders of the layout before evaluations had folders of their own."""
        found = [self.path / n for n in (EVALS, EVAL_JSON, PREDICTIONS_CSV, PREDICTIONS_JSONL, CONFUSION_PNG)]
        found += [self.path / "test", *self.path.glob("eval-*")]
        return [p for p in found if p.exists()]

    def clear_outputs(self) -> None:
        """Remove what a finished or interrupted training left (weights, checkpoints, summary, evaluations of the
        old weights, curves, best weights, tracker files) before a new one."""
        for target in (self.adapter, self.model, self.checkpoints, self.summary_file, *self.eval_files(), self.best,
                       self.tensorboard, self.loss_png):
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def lock(self) -> FolderLock:
        """The exclusive lock of this folder for one writer (``with run.lock(): ...``)."""
        return FolderLock(self.path)

    def running(self) -> dict | None:
        """The live process that holds this folder's lock (a training or evaluation in progress), or None."""
        return FolderLock(self.path).live_holder()

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(p.name.startswith("step-") for p in self.checkpoints.iterdir())

    def clean_temporary(self) -> list[Path]:
        """Remove ``.tmp-*`` items that interrupted writes left here and in ``checkpoints/``."""
        return clean_stale_tmp(self.path) + clean_stale_tmp(self.checkpoints)

    # -- reading ---------------------------------------------------------------------------------------------
    def load_config(self) -> RunConfig:
        if not self.config_file.is_file():
            raise ClmtuneError(f"{self.path} is not a clmtune run folder (no {CONFIG}); give the output_dir of "
                               "`clmtune train`")
        return load_config(self.config_file)

    def load_summary(self) -> dict:
        if not self.summary_file.is_file():
            raise ClmtuneError(f"{self.path} has no {SUMMARY}; did training finish?")
        return json.loads(self.summary_file.read_text(encoding="utf-8"))

    def log_records(self) -> list[dict]:
        """The lines of ``train_log.jsonl`` (one per logged optimizer step), oldest first."""
        if not self.log_file.is_file():
            return []
        return [json.loads(ln) for ln in self.log_file.read_text(encoding="utf-8").splitlines() if ln]

    def labels(self) -> list[str]:
        """The label set training used (empty for tasks without labels)."""
        return self.load_summary().get("labels") or []

    def load_tokenizer(self, cfg: RunConfig | None = None):
        from clmtune.models import load_tokenizer

        cfg = cfg or self.load_config()
        return load_tokenizer(cfg.model, str(self.tokenizer))

    def load_model(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   cfg: RunConfig | None = None):
        """(model, tokenizer) in eval mode on ``device``: the base model + ``adapter/`` (peft), or ``model/``."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from clmtune.models import (check_safetensors, check_tokenizer_fits, fix_prompt_learning_generation,
                                    load_model, resolve_device)

        cfg = cfg or self.load_config()
        device = device if isinstance(device, torch.device) else resolve_device(device)  # bad name fails first
        self.check_finished("load")
        if cfg.peft.method == "full":
            if not self.has_full_model():
                raise ClmtuneError(f"{self.path} has no trained model ({self.model}/{_MODEL_MARK}); did training "
                                   "finish?")
            check_safetensors(self.model, "train the run again")
            model = AutoModelForCausalLM.from_pretrained(self.model, dtype=dtype, use_safetensors=True)
        else:
            if not self.has_adapter():
                raise ClmtuneError(f"{self.path} has no trained adapter ({self.adapter}/{_ADAPTER_MARK}); did "
                                   "training finish?")
            check_safetensors(self.adapter, "train the run again (or `clmtune train --resume` from a checkpoint)")
            base = load_model(cfg.model, dtype)
            try:
                model = PeftModel.from_pretrained(base, str(self.adapter))
            except RuntimeError as exc:  # peft's load_state_dict: 30 lines of "size mismatch for ..." otherwise
                if "size mismatch" not in str(exc):
                    raise
                first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "")
                raise ClmtuneError(f"{self.adapter} does not fit the base model {cfg.model.name_or_path} of "
                                   f"{self.config_file} ({first.rstrip('.')}); use the config.yaml the adapter was "
                                   "trained with, or train again") from None
            fix_prompt_learning_generation(model)
        tok = self.load_tokenizer(cfg)
        check_tokenizer_fits(model, tok, str(self.path))
        return model.eval().to(device), tok

    # -- writing ---------------------------------------------------------------------------------------------
    def save_config(self, cfg: RunConfig) -> Path:
        import yaml

        self.path.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(self.config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))

    def write_json(self, relpath: str | Path, obj: Any) -> Path:
        return write_json_atomic(self.path / relpath, obj)

    def write_text(self, relpath: str | Path, text: str) -> Path:
        return write_text_atomic(self.path / relpath, text)

    def save_weights(self, model, is_peft: bool, state_dict=None) -> Path:
        """``save_pretrained`` into a hidden folder renamed into place: ``adapter/`` (or ``model/``) appears
        complete or not at all. A full disk is one line naming the file; the hidden folder is removed."""
        final = self.weights(is_peft)
        tmp = tmp_sibling(final)
        shutil.rmtree(tmp, ignore_errors=True)
        needed = sum(t.numel() * t.element_size() for t in (state_dict or model.state_dict()).values())
        try:
            with os_errors(tmp, needed):
                model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def save_tokenizer(self, tokenizer) -> Path:
        """The tokenizer, written like the weights (hidden folder, then rename)."""
        tmp = tmp_sibling(self.tokenizer)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with os_errors(tmp):
                tokenizer.save_pretrained(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.tokenizer, ignore_errors=True)
        os.replace(tmp, self.tokenizer)
        return self.tokenizer
