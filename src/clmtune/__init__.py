"""clmtune: fine-tune, evaluate and generate with decoder-only language models and peft adapters."""

__version__ = "0.1.0"
