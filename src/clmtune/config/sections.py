"""The sections of a run configuration other than ``data`` (``config.data``): one dataclass per YAML section, a
docstring per field. The allowed values are in ``config.choices``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clmtune.config.choices import AUTO


@dataclass
class ModelConfig:
    name_or_path: str = AUTO
    """A local model folder, a Hugging Face hub id (needs network the first time), a built-in model
    (``builtin:gpt2-zh-small``: small pretrained Chinese GPT-2 shipped with clmtune; ``builtin:tiny-opt`` & co.:
    tiny models with *random weights*, for trying clmtune out), or ``auto`` (default): ``builtin:gpt2-zh-small``
    for Chinese text (>= 30 % CJK characters in a sample of the training rows), else ``builtin:tiny-opt``."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``name_or_path`` is a hub id."""

    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust that repository."""

    allow_pickle_weights: bool = False
    """Also load ``pytorch_model.bin`` (pickle) weights when a folder has no ``.safetensors`` file. They are
    loaded with ``torch.load(weights_only=True)``; still, only enable this for files you trust."""

    dtype: str = "fp32"
    """Precision the frozen base weights are loaded in: ``fp32``, ``bf16`` or ``fp16`` (half the memory of fp32).
    Trainable adapter weights stay fp32 (peft's ``autocast_adapter_dtype``), so the saved adapter is fp32.
    ``peft.method: full`` trains every weight and needs ``fp32`` (use ``train.precision: bf16`` for speed)."""

    load_in_4bit: bool = False
    """QLoRA: load the frozen base quantized to 4-bit NF4 through ``bitsandbytes`` (``pip install bitsandbytes``,
    on a device bitsandbytes supports, e.g. a CUDA GPU); compute in ``model.dtype`` (bf16 recommended). Adapter
    methods only. A clear error names what is missing where bitsandbytes cannot run."""

    load_in_8bit: bool = False
    """Load the frozen base in 8-bit (LLM.int8) through ``bitsandbytes``; the same conditions as ``load_in_4bit``."""

    attn_implementation: str | None = None
    """The attention kernel transformers uses: ``sdpa`` (PyTorch's fused kernels, transformers' default), ``eager``
    (plain matmul + softmax: the reference, slower) or ``flash_attention_2`` (needs the ``flash-attn`` package and a
    GPU). Unset: transformers' default."""


@dataclass
class PeftSettings:
    method: str = "lora"
    """``lora`` (default), ``prefix_tuning``, ``prompt_tuning``, ``p_tuning``, ``ia3`` (all from the ``peft``
    library), or ``full``: fine-tune every weight, no adapter (the run saves a full model)."""

    r: int = 8
    """``lora`` only: rank."""

    lora_alpha: int = 32
    """``lora`` only: scaling numerator (scale = lora_alpha / r)."""

    lora_dropout: float = 0.1
    """``lora`` only: dropout on the LoRA input."""

    target_modules: list[str] | None = None
    """``lora``/``ia3``: module names to adapt; ``None`` uses peft's default for the model's architecture."""

    num_virtual_tokens: int = 8
    """``prefix_tuning``/``prompt_tuning``/``p_tuning``: number of learned virtual tokens put before every input."""

    init_text: str | None = None
    """``prompt_tuning`` only: initialise the virtual tokens from this text's token embeddings (peft's
    ``PromptTuningInit.TEXT``), e.g. ``Classify if the tweet is a complaint or not:``. ``None``: random init."""

    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed as they are to the method's peft config class (``LoraConfig``,
    ``PrefixTuningConfig``, ``PromptTuningConfig``, ``PromptEncoderConfig``, ``IA3Config``); they override the
    fields above (e.g. ``{use_rslora: true}``, ``{encoder_hidden_size: 128}``, ``{feedforward_modules: [fc2]}``)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/twitter_complaints"
    """Run folder: adapter, tokenizer, resolved config, training log, evaluation results."""

    overwrite: bool = False
    """Allow writing into a folder that already holds a finished run."""

    epochs: int = 10
    """Passes over the training split (50 rows of a RAFT task need several)."""

    max_steps: int | None = None
    """Train exactly this many optimizer steps; ``epochs`` is ignored when this is set (the data is passed over as
    often as needed, as transformers' Trainer does). ``None``: ``epochs`` passes."""

    batch_size: int = 8
    """Rows per forward pass."""

    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step."""

    learning_rate: float | None = None
    """Peak learning rate of AdamW. ``auto`` (or ``null``, the default): ``DEFAULT_LEARNING_RATES[peft.method]``
    (lora 2e-3, ia3 3e-3, prefix_tuning 1e-2, prompt_tuning 3e-2, p_tuning 1e-3, full 3e-4)."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    warmup_steps: int = 0
    """Linear warm-up steps, then linear decay to 0."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this before each optimizer step (``transformers.Trainer``'s default);
    ``null`` disables (the peft example's loop does not clip). Under DeepSpeed set ``gradient_clipping`` in its
    JSON instead."""

    seed: int = 42
    """Seed for weight init of adapters, dropout and data order."""

    log_every: int = 1
    """Write a ``train_log.jsonl`` line every N optimizer steps."""

    precision: str = "auto"
    """``auto``: bf16 where the CPU/GPU has native bf16 matrix units (avx512_bf16 or AMX; Ampere or newer), else
    fp32 (``clmtune.device``; the run summary says which and why). ``bf16``: autocast (weights of trainable
    parameters stay fp32; frozen base weights are stored in bf16 so autocast does not re-cast them every step).
    ``fp32``: full precision, bit-reproducible runs. On a CPU without bf16 support an explicit ``bf16`` falls back
    to fp32 with a warning naming the reason."""

    group_by_length: bool = True
    """Batch rows of similar length together (shuffled groups: rows are shuffled, sorted by length within groups
    of 50 batches, and the batches shuffled), so per-batch padding adds few pad tokens; ``false``: plain shuffle."""

    logits_on_labels_only: bool = True
    """Run the LM head only on the last positions that carry a label (``logits_to_keep``), not at every position;
    the loss is the same. Falls back to full logits (logged) for models whose forward has no ``logits_to_keep``."""

    device_loss: bool | None = None
    """Keep each step's loss on the device and read it on the host only at a log line or a checkpoint (every
    ``train.log_every`` steps): no host synchronisation per step. ``auto`` (``null``): on CUDA (``clmtune.train.speed``)."""

    fused_adamw: bool | None = None
    """``torch.optim.AdamW(fused=True)``: one kernel updates every parameter. ``auto`` (``null``): on CUDA."""

    compile: bool = False
    """``torch.compile`` the model's forward (falls back to eager, logged, when compiling fails)."""

    padding_free: bool = False
    """The rows of a batch packed into one row with no padding, positions restarting per row, attention kept
    within each row (LLaMA-like models; ``clmtune.train.speed.pack_rows``). Pair with
    ``model.attn_implementation: flex_attention`` or ``flash_attention_2`` on a GPU: with ``sdpa`` the per-row mask
    is a dense (tokens x tokens) one."""

    chunked_loss: bool = False
    """The frozen LM head and the cross-entropy in chunks of rows, with no (tokens x vocabulary) logits tensor
    (adapter training; ``train.speed.chunked_head_loss``); on a CPU the fused head loss is used without it."""

    save_steps: int | None = None
    """Write a checkpoint (adapter, optimizer, scheduler, RNG states, step) every N optimizer steps and at the end,
    into ``output_dir/checkpoints/step-NNNNNN``; ``clmtune train --resume`` continues from the latest.
    ``None``: no checkpoints, only the final adapter."""

    save_total_limit: int | None = 2
    """Keep only the last K checkpoints (older ones are deleted); ``None`` keeps all."""

    gradient_checkpointing: bool = False
    """Keep only each transformer layer's input during the forward pass and recompute the rest in the backward pass
    (transformers' ``gradient_checkpointing_enable``, non-reentrant, so no input-gradient hook is needed): the
    same loss and gradients, much less activation memory, ~35 % more compute (bench/README.md)."""

    deterministic: bool = False
    """Use only deterministic kernels (``torch.use_deterministic_algorithms``, cuDNN deterministic, cuBLAS
    workspace config), so a run, and a run resumed from a checkpoint, give bit-identical weights on a GPU. Slower
    on GPUs; an op without a deterministic kernel raises an error naming it."""

    eval_steps: int | None = None
    """Evaluate the held-out split every N optimizer steps (and at the last step): held-out loss for every task,
    plus accuracy and macro-F1 by rank for classification; logged in ``train_log.jsonl`` (``eval_*`` keys), on the
    progress bar and to the trackers. ``None``: evaluate only after training."""

    eval_max_rows: int = 200
    """At most this many rows of the held-out split (its first rows) are evaluated during training, so it stays
    cheap; the evaluation after training uses the whole split."""

    save_best: dict[str, Any] | None = None
    """Keep the best weights as the run's result instead of the last: ``{metric: eval_accuracy, mode: max}``
    (metrics: ``eval_loss`` (mode min), ``eval_accuracy``, ``eval_macro_f1`` (max); ``mode`` defaults to the
    metric's). Needs ``eval_steps``; ``train_summary.json`` says which step the weights come from (``best``)."""

    early_stopping_patience: int | None = None
    """Stop after this many evaluations in a row without improvement of ``save_best``'s metric (``eval_loss``
    without ``save_best``). Needs ``eval_steps``."""

    report_to: list[str] = field(default_factory=list)
    """Trackers that receive loss, learning rate, grad norm, tokens/s and eval metrics, through ``accelerate``:
    ``[tensorboard]`` writes ``RUN/tensorboard/`` (``pip install 'clmtune[tensorboard]'``; view with
    ``tensorboard --logdir runs/``)."""

    deepspeed: str | None = None
    """DeepSpeed config JSON (e.g. ``configs/deepspeed/zero3_offload.json``) handed to the engine through
    ``accelerate``; needs ``pip install deepspeed`` and GPUs. ``None``: plain DDP / single process."""




@dataclass
class PreferenceConfig:
    """``data.task: preference`` only: the loss on prompt/chosen/rejected pairs (TRL's formulas and names)."""

    loss: str = "dpo"
    """``dpo`` (sigmoid of the reward margin against a reference model), ``ipo`` (squared, length-averaged margin
    against the reference), ``orpo`` (log odds ratio + NLL on the chosen response, no reference), ``simpo``
    (length-averaged log-probabilities with a target margin ``gamma``, no reference)."""

    beta: float = 0.1
    """Temperature of the reward (dpo, ipo: the KL strength; simpo: the reward scale, 2.0..2.5 in the paper)."""

    label_smoothing: float = 0.0
    """dpo and simpo: the probability that a pair's labels are flipped (conservative DPO); 0 is plain DPO."""

    lambda_: float = 0.1
    """orpo: the weight of the odds-ratio term against the NLL of the chosen response (TRL's ORPO ``beta``).
    Written ``lambda`` in YAML and on the command line (``--preference.lambda 0.2``)."""

    gamma: float = 0.5
    """simpo: the target reward margin (TRL's CPO ``simpo_gamma``)."""

    precompute_reference: bool = False
    """dpo/ipo: compute the reference log-probabilities of every training pair once before training (no reference
    forward per step). Otherwise an adapter run uses the same weights with the adapter switched off and a full
    fine-tuning run keeps a frozen copy of the starting weights."""


@dataclass
class EvalConfig:
    method: str = "auto"
    """``rank``: score every label's tokens after the prompt and pick the most likely (never invalid);
    ``constrained``: greedy decoding restricted to the label prefix tree (never invalid, about the cost of
    ``generate``; see ``clmtune.constrained``); ``generate``: greedy decoding, compared with the label names (the
    peft example's method); ``auto``: ``rank``, or ``constrained`` when the label prefix tree has more than
    ``CONSTRAINED_ABOVE_NODES`` (64) nodes (many or long labels, where scoring every tree node costs more than
    decoding: banking_77's 77 labels make 232 nodes)."""

    batch_size: int = 16
    """Rows per forward pass during evaluation."""

    normalize_by_length: bool = False
    """``rank`` only: compare mean instead of summed log-likelihood per label token."""

    map_invalid: bool = True
    """``generate`` only: also report metrics with each invalid output mapped to the nearest label by edit distance
    (as peft's example does for RAFT submissions); the raw metrics are always reported too. Submissions use the
    mapped labels."""

    dtype: str = "auto"
    """Precision of the weights for evaluation: ``auto`` (default: bf16 where the hardware has native bf16 matrix
    units, as ``generate.dtype``, else fp32; 1.5-2.5x faster on an avx512_bf16 CPU; on a LoRA-trained model 99.8 %
    of the predicted labels were the same as in fp32, bench/README.md), ``fp32`` (metrics reproducible bit for bit
    on any machine) or ``bf16``."""

    device: str = "auto"
    """Where evaluation runs: ``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``."""


@dataclass
class GenerateConfig:
    max_new_tokens: int = 32
    """Upper bound on generated tokens per sequence."""

    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""

    top_k: int = 10
    """Sample among the k most likely tokens (0 disables)."""

    top_p: float = 1.0
    """Nucleus sampling: smallest set of tokens with this total probability (1 disables)."""

    num_return_sequences: int = 1
    """Continuations per prompt."""

    seed: int = 0
    """Seed for sampling, so output is reproducible."""

    repetition_penalty: float = 1.0
    """Divide the logits of tokens already in the sequence by this (CTRL paper's penalty; 1 disables)."""

    stop: list[str] = field(default_factory=list)
    """Stop a continuation when it contains one of these strings (the string itself is not returned)."""

    batch_size: int = 8
    """Prompts per ``generate`` call (left-padded together)."""

    truncate: bool = True
    """A prompt longer than the model's context (minus ``max_new_tokens``) keeps its end and a warning is logged;
    ``False``: it is an error."""

    device: str = "auto"
    """Where generation runs: ``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``."""

    dtype: str = "auto"
    """Precision of the weights for generation: ``auto`` (bf16 where the CPU/GPU has native bf16 matrix units:
    avx512_bf16/AMX, Ampere+; else fp32), ``bf16`` or ``fp32``. See ``clmtune.device``."""
