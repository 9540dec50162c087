"""Memory estimate of a training run — weights, gradients, optimizer state, activations — and the measured peak.

Why hand-written: ``accelerate estimate-memory`` counts a hub model's weights (and Adam as 4x the weights for full
training); it knows nothing of an adapter (where only a few parameters have gradients and optimizer state), of the
frozen base stored in bf16, of the batch, or of activations, which decide whether a LoRA run fits.

The activation model counts, per transformer layer and token, the tensors autograd keeps for the backward pass
(elements, then bytes of the compute dtype):

    attention: layer-norm input d, its output (the q/k/v input) d, q d, k and v 2*d_kv, attention output d
               (input of the output projection), + heads*L attention probabilities when attention is not fused
               (``eager``; sdpa's fused kernels keep only a per-head log-sum-exp)
    MLP:       layer-norm input d, its output d, and k*f for the intermediate: k = 2 for a fused activation
               (fc1 output, activation output), 4 for a gated MLP (gate, up, activation, product), 5 for the
               tanh-approximated GELUs that transformers writes as several Python ops (GPT-2's ``gelu_new``,
               BLOOM's): every op keeps its input; 2 for them too in bf16 adapter training on a CPU, which runs
               them as one op (``clmtune.train.precision.one_op_tanh_gelu``)
    adapters:  LoRA keeps its dropout output (d) for each adapted linear

With gradient checkpointing only each layer's input (d) is kept, plus one layer's full set while it is recomputed.
The LM head's logits are counted where they are computed: fp32 logits and their gradient for every position that
runs the head (clmtune: the supervised positions only; a plain recipe: every position), or, when training fuses
the frozen head with the loss (``clmtune.train.fusedhead``), one vocabulary block of them (``lm_head_bytes``). This ignores allocator
fragmentation and temporary buffers inside kernels, so the measured peak is higher; ``runtime`` (the process's
resident memory before the model is loaded: Python, torch, tokenizers) is reported beside the estimate so a CPU
peak RSS can be compared with ``runtime + total``.
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
        return cls(hidden=int(hidden), layers=int(layers), heads=int(heads), kv_heads=int(kv_heads),
                   intermediate=int(intermediate), vocab=int(config.vocab_size), mlp_saved=saved)


@dataclass
class MemoryEstimate:
    """Bytes of each part; ``total`` is their sum (``runtime`` is reported beside it, not in it)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    lm_head: int
    runtime: int = 0
    gradient_checkpointing: bool = False
    batch_size: int = 0
    seq_len: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.lm_head

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d

    def table(self, measured_peak: int | None = None) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("LM head logits", self.lm_head), ("estimate", self.total),
                ("runtime before load", self.runtime)]
        if measured_peak is not None:
            rows.append(("measured peak", measured_peak))
        what = (f"memory estimate (batch {self.batch_size} x {self.seq_len} tokens, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'})")
        return "\n".join([what] + [f"  {name:<20} {mib(v):>10}" for name, v in rows])


def mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB" if n < 10 * GIB else f"{n / GIB:,.2f} GiB"


def activation_elements_per_token_layer(shape: ModelShape, seq_len: int, fused_attention: bool,
                                        lora_linears_per_layer: int = 0) -> int:
    """Elements autograd keeps per token for one layer, without checkpointing (see the module docstring)."""
    d, head_dim = shape.hidden, shape.hidden // shape.heads
    d_kv = shape.kv_heads * head_dim
    attention = 2 * d + d + 2 * d_kv + d
    if not fused_attention:
        attention += shape.heads * seq_len
    mlp = 2 * d + shape.mlp_saved * shape.intermediate
    return attention + mlp + lora_linears_per_layer * d


def estimate(shape: ModelShape, *, total_params: int, trainable_params: int, weight_bytes: int | None = None,
             batch_size: int, seq_len: int, head_positions: int, compute_dtype: torch.dtype = torch.float32,
             gradient_checkpointing: bool = False, fused_attention: bool = True, trains_base: bool = False,
             lora_linears_per_layer: int = 0, optimizer_states: int = 2, runtime: int = 0) -> MemoryEstimate:
    """Estimate one training step's memory.

    total_params / trainable_params: counted on the model as it will train (adapters included).
    weight_bytes: bytes of every parameter as stored (bf16 base: 2 per frozen weight); default 4 per parameter.
    head_positions: positions of the whole batch at which the LM head runs.
    trains_base: full fine-tuning; the activations are needed either way (a LoRA in layer 1 needs gradients
      through every later layer), so this only documents the call.
    optimizer_states: AdamW keeps 2 fp32 tensors per trainable parameter.
    """
    del trains_base
    tokens = batch_size * seq_len
    per_elem = torch.tensor([], dtype=compute_dtype).element_size()
    per_layer = activation_elements_per_token_layer(shape, seq_len, fused_attention, lora_linears_per_layer)
    embed = 2 * shape.hidden  # embedding output + final layer-norm input
    if gradient_checkpointing:
        acts = tokens * (shape.layers * shape.hidden + per_layer + embed)
    else:
        acts = tokens * (shape.layers * per_layer + embed)
    return MemoryEstimate(
        weights=weight_bytes if weight_bytes is not None else 4 * total_params,
        gradients=4 * trainable_params,
        optimizer=4 * optimizer_states * trainable_params,
        activations=acts * per_elem,
        lm_head=2 * 4 * head_positions * shape.vocab,  # fp32 logits + their gradient
        runtime=runtime, gradient_checkpointing=gradient_checkpointing, batch_size=batch_size, seq_len=seq_len)


def estimate_for_model(model, *, batch_size: int, seq_len: int, head_positions: int,
                       compute_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                       runtime: int = 0, one_op_gelu: bool = False) -> MemoryEstimate:
    """The estimate for an instantiated (possibly peft-wrapped) model: parameter counts and stored bytes are exact.
    ``one_op_gelu``: training runs a multi-op tanh-GELU as one op (it then keeps 2 intermediate tensors, not 5).

    The frozen LM head's column-major bf16 copy (bf16 training on a CPU) costs nothing extra: it replaces the
    row-major bf16 copy, byte for byte, and is written in small blocks (no full-size temporary)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = list(model.parameters())

    def numel(p):  # DeepSpeed ZeRO-3 partitions parameters: the local tensor is empty, ds_numel the full count
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in params)
    trainable = sum(numel(p) for p in params if p.requires_grad)
    stored = sum(numel(p) * p.element_size() for p in params)
    lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_dropout"))
    layers = ModelShape.from_config(base.config)
    if one_op_gelu and layers.mlp_saved == 5:
        layers = replace(layers, mlp_saved=2)
    attn = getattr(base.config, "_attn_implementation", None) or "sdpa"
    return estimate(layers, total_params=total, trainable_params=trainable, weight_bytes=stored,
                    batch_size=batch_size, seq_len=seq_len, head_positions=head_positions,
                    compute_dtype=compute_dtype, gradient_checkpointing=gradient_checkpointing,
                    fused_attention=attn != "eager", lora_linears_per_layer=lora // max(layers.layers, 1),
                    runtime=runtime)


def estimate_run(model, lengths: list[int], label_counts: list[int], cfg, precision: str, head_mode: str | None,
                 runtime: int = 0, lm_head_bytes=None) -> MemoryEstimate:
    """The estimate of a clmtune run (``cfg``: its ``RunConfig``) for the longest batch it will see.

    ``lengths``/``label_counts``: tokens and supervised tokens of each training row. The sequence length is the
    longest row (``padding: longest`` pads each batch to its longest row) or ``max_length``, plus virtual tokens;
    the LM head runs on the supervised positions of every row (``head_mode`` set) or at every position.
    ``lm_head_bytes``: positions -> the LM head's bytes, when training computes it otherwise than as (positions, V)
    fp32 logits and their gradient (the fused frozen-head loss: ``clmtune.train.fusedhead.fused_head_bytes``);
    ``clmtune prepare`` does not know whether training will fuse and counts full logits (an upper bound).
    """
    from clmtune.models import input_virtual_tokens, model_dtype, unwrap

    t_cfg, d_cfg = cfg.train, cfg.data
    seq = max(lengths, default=1)
    if d_cfg.padding == "max_length":
        seq = max(seq, d_cfg.max_length)
    seq += input_virtual_tokens(model)
    batch = min(t_cfg.batch_size, max(len(lengths), 1))
    positions = batch * (max(label_counts, default=1) if head_mode else seq)
    compute = torch.bfloat16 if precision == "bf16" else model_dtype(cfg.model)  # the activations' dtype
    from clmtune.device import training_device

    one_op_gelu = (precision == "bf16" and cfg.peft.method != "full" and t_cfg.deepspeed is None
                   and training_device() == "cpu")  # as TrainRecipe._setup_optimization decides
    est = estimate_for_model(unwrap(model), batch_size=batch, seq_len=seq, head_positions=positions,
                             compute_dtype=compute, gradient_checkpointing=t_cfg.gradient_checkpointing,
                             runtime=runtime, one_op_gelu=one_op_gelu)
    if precision == "bf16":
        est = replace(est, weights=est.weights + autocast_weight_copies_bytes(unwrap(model)))
    return est if lm_head_bytes is None else replace(est, lm_head=lm_head_bytes(positions))


def swapped_originals_bytes(swapped, device: torch.device | str) -> int:
    """Bytes of the fp32 originals that bf16 training keeps of the frozen matmul weights
    (``clmtune.train.precision.frozen_matmul_weights_to_bf16``: (parameter, fp32 data) pairs), counted only when they
    live on the training device. On a GPU they do not: the swap happens before the model moves to the device, so
    only the bf16 copies go there and the originals stay in host memory (BLOOM-560m: 2.2 GB the GPU estimate
    counted and the GPU never held)."""
    kind = torch.device(device).type
    return sum(d.numel() * d.element_size() for _, d in swapped if d.device.type == kind)


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
    return estimate_run(model, lengths, label_counts, cfg, precision, head, runtime=current_rss())


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
