"""Memory estimate of a training run — weights, gradients, optimizer state, activations — and the measured peak.

Why hand-written: ``accelerate estimate-memory`` counts a hub model's weights (and Adam as 4x the weights for full
training); it knows nothing of an adapter (where only a few parameters have gradients and optimizer state), of the
frozen base stored in bf16, of the batch, or of activations, which decide whether a LoRA run fits.

What it estimates (``MemoryEstimate.peak``, said in every table): on a CPU the peak resident memory (RSS) of the
training process, from its start, nothing subtracted: ``runtime`` (the process measured just before the weights
load: Python, torch, transformers, peft, the tokenizer and the tokenized data; several hundred MiB) plus the
training step's parts below. On a GPU the peak of ``torch.cuda.max_memory_allocated`` (no Python, no host
memory): the step's parts without ``runtime``.

The activation model counts, per transformer layer and token, the tensors autograd keeps for the backward pass
(bytes of the compute dtype, or of the weights' dtype for the residual stream, which stays fp32 under bf16
autocast):

    attention: layer-norm input d, its output (the q/k/v input) d, q d, k and v 2*d_kv, attention output d
               (input of the output projection). Unfused attention (``eager``, or SDPA's math kernel, which the
               CPU runs whenever the probabilities have dropout in training: GPT-2's ``attn_pdrop`` 0.1) adds
               fp32 copies of q, k, v and heads*L fp32 probabilities, three times with dropout (softmax output,
               dropout noise, their product): for the shipped gpt2-zh-small at 256 tokens that is most of it
    MLP:       layer-norm input d, its output d, and k*f for the intermediate: k = 2 for a fused activation
               (fc1 output, activation output), 4 for a gated MLP (gate, up, activation, product), 5 for the
               tanh-approximated GELUs that transformers writes as several Python ops (GPT-2's ``gelu_new``,
               BLOOM's): every op keeps its input; 2 for them too in bf16 adapter training on a CPU, which runs
               them as one op (``clmtune.train.precision.one_op_tanh_gelu``)
    dropout:   a noise tensor per residual-branch dropout (CPU dropout is ``input * noise``; CUDA keeps a bool mask)
    adapters:  LoRA with dropout keeps its dropout output (and on a CPU the noise) of each adapted linear's input

With gradient checkpointing only each layer's input (d) is kept, plus one layer's full set while it is recomputed.
The backward pass's temporaries are a measured fraction of the activations (``BACKWARD_WORKSPACE``, CPU only).
The LM head's logits are counted where they are computed: fp32 logits and their gradient for every position that
runs the head (clmtune: the supervised positions only; a plain recipe: every position), or, when training fuses
the frozen head with the loss (``clmtune.train.fusedhead``), one vocabulary block of them (``lm_head_bytes``).
How close it comes: ``bench/bench_memory.py --matrix`` and tests/test_memory_peak.py (within 25 % both ways of
the measured peak RSS on the CPU matrix).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, replace

import torch

GIB = 2 ** 30
MIB = 2 ** 20


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model's architecture (read from its transformers config)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    mlp_saved: int
    """Intermediate-sized tensors kept per MLP for the backward pass (see the module docstring)."""
    attn_dropout: float = 0.0
    """Dropout on the attention probabilities in training (GPT-2's ``attn_pdrop``, OPT's ``attention_dropout``)."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches (GPT-2's ``resid_pdrop``, OPT's ``dropout``, BLOOM's ``hidden_dropout``)."""

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a ``transformers`` ``PretrainedConfig`` (GPT-2, OPT, BLOOM, LLaMA, Mistral, Qwen ... attribute names)."""
        def first(*names, default=None):
            for n in names:
                v = getattr(config, n, None)
                if v is not None:
                    return v
            return default

        hidden = first("hidden_size", "n_embd", "d_model")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        heads = first("num_attention_heads", "n_head")
        if hidden is None or layers is None or heads is None:
            raise ValueError(f"cannot read the size of a {type(config).__name__}: no hidden size / layers / heads")
        kv_heads = first("num_key_value_heads", default=heads)
        intermediate = first("intermediate_size", "ffn_dim", "n_inner", default=None) or 4 * hidden
        act = str(first("hidden_act", "activation_function", default="")).lower()
        if act in ("silu", "swiglu", "swish") or getattr(config, "model_type", "") in ("llama", "mistral", "qwen2",
                                                                                      "qwen3", "gemma"):
            saved = 4
        elif act in ("gelu_new", "gelu_fast") or getattr(config, "model_type", "") == "bloom":
            saved = 5
        else:
            saved = 2
        attn_p = first("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob", default=0.0)
        hidden_p = first("resid_pdrop", "hidden_dropout", "hidden_dropout_prob", "dropout", default=0.0)
        return cls(hidden=int(hidden), layers=int(layers), heads=int(heads), kv_heads=int(kv_heads),
                   intermediate=int(intermediate), vocab=int(config.vocab_size), mlp_saved=saved,
                   attn_dropout=_probability(attn_p), hidden_dropout=_probability(hidden_p))


def _probability(value) -> float:
    """A config's dropout probability; anything else under the same name (a module, a flag) counts as none."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


@dataclass
class MemoryEstimate:
    """Bytes of each part; ``total`` is their sum, the training step's memory (``runtime`` is not in it).

    What it estimates (``peak``): on a CPU the peak resident memory (RSS) of the training process, which holds the
    Python runtime too: ``runtime + total``; on a GPU the peak of ``torch.cuda.max_memory_allocated``: ``total``."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    lm_head: int
    runtime: int = 0
    gradient_checkpointing: bool = False
    batch_size: int = 0
    seq_len: int = 0
    workspace: int = 0
    """The backward pass's temporaries: gradients of the saved tensors and kernel buffers while they are freed."""
    device: str = "cpu"

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace + self.lm_head

    @property
    def peak(self) -> int:
        """The estimated peak: resident memory of the training process (CPU) or CUDA memory allocated (GPU)."""
        return self.total + (self.runtime if self.device == "cpu" else 0)

    @property
    def measures(self) -> str:
        return ("peak resident memory (RSS) of the training process" if self.device == "cpu" else
                "peak CUDA memory allocated by torch (torch.cuda.max_memory_allocated)")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(total=self.total, peak=self.peak, measures=self.measures)
        return d

    def table(self, measured_peak: int | None = None) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("backward workspace", self.workspace),
                ("LM head logits", self.lm_head), ("training step", self.total)]
        if self.device == "cpu":
            rows.append(("runtime before load", self.runtime))
        rows.append(("estimated peak", self.peak))
        if measured_peak is not None:
            rows.append(("measured peak", measured_peak))
        what = (f"memory estimate (batch {self.batch_size} x {self.seq_len} tokens, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}): {self.measures}")
        return "\n".join([what] + [f"  {name:<20} {mib(v):>10}" for name, v in rows])


def mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB" if n < 10 * GIB else f"{n / GIB:,.2f} GiB"


BACKWARD_WORKSPACE = 0.25
"""The backward pass's temporaries as a fraction of the activations: each op allocates its input gradients
before autograd frees what it saved, and the allocator keeps freed blocks. Measured, not derived: on the CPU
matrix of ``bench/bench_memory.py --matrix`` the peak RSS above the weights and the saved tensors was 0.05-0.3x
the saved tensors (adapters higher, full fine-tuning lower: its weight gradients are allocated during the
backward, counted here beyond them). With gradient checkpointing, one layer's set instead.
Not measured on a GPU, where the caching allocator behaves differently: 0 there."""


def activation_bytes_per_token_layer(shape: ModelShape, seq_len: int, *, compute_bytes: int = 4,
                                     norm_bytes: int = 4, math_attention: bool = False, cpu: bool = True,
                                     lora_inputs: int = 0, lora_dropout: bool = False) -> int:
    """Bytes autograd keeps per token for one layer, without checkpointing (see the module docstring).

    ``norm_bytes``: the layer norms' inputs and outputs (the residual stream, in the weights' dtype: fp32 under
    bf16 autocast); ``compute_bytes``: the matmul outputs. ``math_attention``: attention runs unfused (``eager``,
    or SDPA's math kernel, which the CPU uses when the attention probabilities have dropout): it keeps the
    probabilities in fp32 (softmax output; with dropout also the dropout's noise and its product, as CPU dropout
    is ``input * noise``) and fp32 copies of q, k and v. ``lora_inputs``: input features of the LoRA-adapted
    linears of a layer; with LoRA dropout each keeps its dropout output (and on a CPU the noise)."""
    d, head_dim = shape.hidden, shape.hidden // shape.heads
    d_kv = shape.kv_heads * head_dim
    a = compute_bytes
    attention = 2 * d * norm_bytes + (2 * d + 2 * d_kv) * a
    if math_attention:
        probs = 3 if shape.attn_dropout > 0 else 1
        attention += 4 * (probs * shape.heads * seq_len + d + 2 * d_kv)
    mlp = 2 * d * norm_bytes + shape.mlp_saved * shape.intermediate * a
    dropout = 0
    if shape.hidden_dropout > 0:  # the two residual branches: a noise tensor each (CUDA's fused dropout: a bool mask)
        dropout = 2 * d * (a if cpu else 1)
    if lora_dropout:
        dropout += lora_inputs * (2 * a if cpu else a + 1)
    return attention + mlp + dropout


def estimate(shape: ModelShape, *, total_params: int, trainable_params: int, weight_bytes: int | None = None,
             batch_size: int, seq_len: int, head_positions: int, compute_dtype: torch.dtype = torch.float32,
             norm_dtype: torch.dtype | None = None, gradient_checkpointing: bool = False,
             fused_attention: bool = True, lora_inputs_per_layer: int = 0, lora_dropout: bool = False,
             optimizer_states: int = 2, runtime: int = 0, device: str = "cpu",
             workspace: float | None = None) -> MemoryEstimate:
    """Estimate one training step's memory.

    total_params / trainable_params: counted on the model as it will train (adapters included).
    weight_bytes: bytes of every parameter as stored (bf16 base: 2 per frozen weight); default 4 per parameter.
    batch_size: rows of one forward pass (a preference batch: chosen and rejected rows, twice the pairs).
    head_positions: positions of the whole batch at which the LM head runs.
    fused_attention: the attention kernel keeps no probabilities. On a CPU SDPA falls back to its math kernel
      when the probabilities have dropout in training (``shape.attn_dropout``): then it is unfused either way.
    optimizer_states: AdamW keeps 2 fp32 tensors per trainable parameter.
    workspace: the backward's temporaries as a fraction of the activations (default ``BACKWARD_WORKSPACE`` on a
      CPU, 0 on a GPU, where it has not been measured).
    """
    cpu = device == "cpu"
    tokens = batch_size * seq_len
    per_elem = torch.tensor([], dtype=compute_dtype).element_size()
    norm_elem = torch.tensor([], dtype=norm_dtype or compute_dtype).element_size()
    math_attention = not fused_attention or (cpu and shape.attn_dropout > 0)
    per_layer = activation_bytes_per_token_layer(
        shape, seq_len, compute_bytes=per_elem, norm_bytes=norm_elem, math_attention=math_attention, cpu=cpu,
        lora_inputs=lora_inputs_per_layer, lora_dropout=lora_dropout)
    embed = 2 * shape.hidden * norm_elem  # embedding output + final layer-norm input
    if shape.hidden_dropout > 0:
        embed += shape.hidden * (per_elem if cpu else 1)
    if gradient_checkpointing:
        acts = tokens * (shape.layers * shape.hidden * norm_elem + per_layer + embed)
    else:
        acts = tokens * (shape.layers * per_layer + embed)
    frac = (BACKWARD_WORKSPACE if cpu else 0.0) if workspace is None else workspace
    if gradient_checkpointing:  # the recomputed layer's backward temporaries: about one more layer's set (CPU)
        space = tokens * per_layer if frac else 0
    else:
        space = frac * acts
    # optimizer.zero_grad frees the weight gradients every step: the backward allocates them while it frees the
    # saved tensors, so the temporaries count only above them (full fine-tuning; an adapter's are small)
    space = max(0, space - 4 * trainable_params) if frac else space
    return MemoryEstimate(
        weights=weight_bytes if weight_bytes is not None else 4 * total_params,
        gradients=4 * trainable_params,
        optimizer=4 * optimizer_states * trainable_params,
        activations=acts, workspace=int(space),
        lm_head=2 * 4 * head_positions * shape.vocab,  # fp32 logits + their gradient
        runtime=runtime, gradient_checkpointing=gradient_checkpointing, batch_size=batch_size, seq_len=seq_len,
        device=device)


def lora_inputs(model) -> int:
    """Input features of every LoRA-adapted linear layer (the sizes their dropout keeps)."""
    total = 0
    for _, module in model.named_modules():
        if hasattr(module, "lora_dropout") and hasattr(module, "base_layer"):
            base = module.base_layer
            w = getattr(base, "weight", None)
            if hasattr(base, "in_features"):
                total += int(base.in_features)
            elif w is not None and w.dim() == 2:  # GPT-2's Conv1D stores (in, out)
                total += int(w.shape[0] if type(base).__name__ == "Conv1D" else w.shape[1])
    return total


def has_lora_dropout(model) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for n, m in model.named_modules()
               if ".lora_dropout." in f".{n}." or n.endswith("lora_dropout"))


def estimate_for_model(model, *, batch_size: int, seq_len: int, head_positions: int,
                       compute_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                       runtime: int = 0, one_op_gelu: bool = False, device: str = "cpu",
                       training: bool = True) -> MemoryEstimate:
    """The estimate for an instantiated (possibly peft-wrapped) model: parameter counts and stored bytes are exact.
    ``one_op_gelu``: training runs a multi-op tanh-GELU as one op (it then keeps 2 intermediate tensors, not 5).
    ``training``: dropout is active (``model.train()``); off, the model's dropout keeps nothing.

    The frozen LM head's column-major bf16 copy (bf16 training on a CPU) costs nothing extra: it replaces the
    row-major bf16 copy, byte for byte, and is written in small blocks (no full-size temporary)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = list(model.parameters())

    def numel(p):  # DeepSpeed ZeRO-3 partitions parameters: the local tensor is empty, ds_numel the full count
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in params)
    trainable = sum(numel(p) for p in params if p.requires_grad)
    stored = sum(numel(p) * p.element_size() for p in params)
    layers = ModelShape.from_config(base.config)
    if one_op_gelu and layers.mlp_saved == 5:
        layers = replace(layers, mlp_saved=2)
    if not training:
        layers = replace(layers, attn_dropout=0.0, hidden_dropout=0.0)
    attn = getattr(base.config, "_attn_implementation", None) or "sdpa"
    norm = next((p.dtype for n, p in base.named_parameters() if "norm" in n or "ln" in n), None)
    return estimate(layers, total_params=total, trainable_params=trainable, weight_bytes=stored,
                    batch_size=batch_size, seq_len=seq_len, head_positions=head_positions,
                    compute_dtype=compute_dtype, norm_dtype=norm if norm is not None and norm.is_floating_point
                    else None, gradient_checkpointing=gradient_checkpointing, fused_attention=attn != "eager",
                    lora_inputs_per_layer=lora_inputs(model) // max(layers.layers, 1),
                    lora_dropout=training and has_lora_dropout(model), runtime=runtime, device=device)


def estimate_run(model, lengths: list[int], label_counts: list[int], cfg, precision: str, head_mode: str | None,
                 runtime: int = 0, lm_head_bytes=None) -> MemoryEstimate:
    """The estimate of a clmtune run (``cfg``: its ``RunConfig``) for the longest batch it will see.

    ``lengths``/``label_counts``: tokens and supervised tokens of each training row. The sequence length is the
    longest row (``padding: longest`` pads each batch to its longest row) or ``max_length``, plus virtual tokens;
    the LM head runs on the supervised positions of every row (``head_mode`` set) or at every position. A
    preference batch runs its chosen and rejected rows in one forward pass (twice the rows, padded to one length:
    a pair's length is the longer of its two sequences; training passes the chosen's) and, for the reference, a
    forward without gradients (the same weights with the adapter off, or with full fine-tuning a frozen copy).
    ``lm_head_bytes``: positions -> the LM head's bytes, when training computes it otherwise than as (positions, V)
    fp32 logits and their gradient (the fused frozen-head loss: ``clmtune.train.fusedhead.fused_head_bytes``);
    ``clmtune prepare`` does not know whether training will fuse and counts full logits (an upper bound).
    """
    from clmtune.device import training_device
    from clmtune.models import input_virtual_tokens, model_dtype, unwrap
    from clmtune.tasks.preference_loss import REFERENCE_LOSSES

    t_cfg, d_cfg = cfg.train, cfg.data
    device = training_device()
    pairs = d_cfg.task == "preference"
    seq = max(lengths, default=1)
    if d_cfg.padding == "max_length":
        seq = max(seq, d_cfg.max_length)
    seq += input_virtual_tokens(model)
    rows = min(t_cfg.batch_size, max(len(lengths), 1))
    batch = rows * (2 if pairs else 1)
    # the head's positions: at most the supervised tokens of the `rows` rows that have the most of them
    supervised = sum(sorted(label_counts, reverse=True)[:rows]) * (2 if pairs else 1) or batch
    positions = supervised if head_mode else batch * seq
    compute = torch.bfloat16 if precision == "bf16" else model_dtype(cfg.model)  # the activations' dtype
    one_op_gelu = (precision == "bf16" and cfg.peft.method != "full" and t_cfg.deepspeed is None
                   and device == "cpu")  # as train.setup.setup_optimization decides
    est = estimate_for_model(unwrap(model), batch_size=batch, seq_len=seq, head_positions=positions,
                             compute_dtype=compute, gradient_checkpointing=t_cfg.gradient_checkpointing,
                             runtime=runtime, one_op_gelu=one_op_gelu, device=device)
    if precision == "bf16":
        est = replace(est, weights=est.weights + autocast_weight_copies_bytes(unwrap(model)))
    if pairs and cfg.peft.method == "full" and cfg.preference.loss in REFERENCE_LOSSES \
            and not cfg.preference.precompute_reference:  # the frozen copy of the starting weights
        copy = sum(p.numel() * p.element_size() for p in unwrap(model).parameters())
        est = replace(est, weights=est.weights + copy)
    if lm_head_bytes is not None:
        est = replace(est, lm_head=lm_head_bytes(positions))
    elif pairs:  # the preference loss's per-token log-probabilities: a log-softmax of the logits and its gradient
        est = replace(est, lm_head=2 * est.lm_head)
    return est


def swapped_originals_bytes(swapped, device: torch.device | str) -> int:
    """Bytes of the fp32 originals that bf16 training keeps of the frozen matmul weights
    (``clmtune.train.precision.frozen_matmul_weights_to_bf16``: (parameter, fp32 data) pairs), counted only when they
    live on the training device. On a GPU they do not: the swap happens before the model moves to the device, so
    only the bf16 copies go there and the originals stay in host memory (BLOOM-560m: 2.2 GB the GPU estimate
    counted and the GPU never held)."""
    kind = torch.device(device).type
    return sum(d.numel() * d.element_size() for _, d in swapped if d.device.type == kind)


def frozen_fp32_matmul_params(model) -> int:
    """Parameters of the frozen fp32 Linear/Conv1D weights: what bf16 adapter training stores a bf16 copy of
    (``clmtune.train.precision.frozen_matmul_weights_to_bf16``), keeping the fp32 originals in host memory."""
    seen, total = set(), 0
    for module in model.modules():
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        w = module.weight
        if not w.requires_grad and w.dtype == torch.float32 and id(w) not in seen:
            seen.add(id(w))
            total += w.numel()
    return total


def autocast_weight_copies_bytes(model) -> int:
    """bf16 autocast casts every trainable fp32 matmul weight to bf16 at the forward, and the matmul keeps the
    cast for its backward: 2 bytes per such parameter until the backward frees them (full fine-tuning of
    BLOOM-560m: 1.1 GB). Frozen weights are stored in bf16 already (no copy)."""
    seen, total = set(), 0
    for module in model.modules():
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        w = module.weight
        if w.requires_grad and w.dtype == torch.float32 and id(w) not in seen:
            seen.add(id(w))
            total += 2 * getattr(w, "ds_numel", w.numel())
    return total


def estimate_before_loading(cfg, lengths: list[int], label_counts: list[int]) -> MemoryEstimate:
    """The run's estimate without reading any weights: the model and its adapter are built on the ``meta``
    device (shapes only) from the model's config.json (``clmtune prepare`` prints this)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from clmtune.models import apply_peft, model_dtype, resolve_model_path

    target = resolve_model_path(cfg.model.name_or_path)
    config = AutoConfig.from_pretrained(target, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=model_dtype(cfg.model),
                                                 trust_remote_code=cfg.model.trust_remote_code)
        model = apply_peft(model, cfg.peft, tokenizer_path=target)
    from clmtune.device import resolve_precision, training_device

    head = "mask" if cfg.train.logits_on_labels_only else None
    precision, _ = resolve_precision(cfg.train.precision, training_device())  # as training will resolve it
    est = estimate_run(model, lengths, label_counts, cfg, precision, head, runtime=current_rss())
    if precision == "bf16" and cfg.peft.method != "full" and cfg.train.deepspeed is None:
        # training stores the frozen matmul weights' bf16 copies: beside the fp32 originals on a CPU, instead of
        # them on a GPU (the originals stay in host memory)
        frozen = frozen_fp32_matmul_params(model)
        est = replace(est, weights=est.weights + (2 if est.device == "cpu" else -2) * frozen)
    return est


def runtime_rss() -> int:
    """Resident memory of this process before the weights load, with the libraries that loading brings in
    (peft, accelerate: ~160 MiB of RSS that a measurement taken before their import would leave out)."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401

    return current_rss()


def current_rss() -> int:
    """Resident memory of this process now (bytes; Linux /proc, else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """The process's peak resident memory in bytes since the start or the last ``reset_peak`` (Linux: VmHWM of
    /proc/self/status; elsewhere ru_maxrss: KiB on Linux, bytes on macOS, never reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak(device: torch.device | str | None = None) -> None:
    """Measure the peak from now on: ``torch.cuda.reset_peak_memory_stats`` on a GPU; on Linux, writing 5 to
    /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS, so a run in a notebook or test process
    is not charged with what earlier work in the process used."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measured_peak(device: torch.device | str | None = None) -> int:
    """Peak memory of the training device: ``torch.cuda.max_memory_allocated`` on a GPU, peak RSS on the CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return peak_rss()
