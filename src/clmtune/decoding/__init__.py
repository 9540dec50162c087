"""Decoding, a foundation: every stage that writes text (generate, chat, serve, reply evaluation) goes through the
one loop of ``core`` (batching, KV cache, stop tokens and strings, greedy and per-row seeded sampling, streaming),
and shares the loading (``loading``), the sampling settings (``sampling``) and the text handling (``text``).
"""

from clmtune.decoding.core import Decoder, Row
from clmtune.decoding.loading import load_for_generation
from clmtune.decoding.sampling import Sampling, pick, row_seed
from clmtune.decoding.text import CleanStreamer, decode, encode_prompts, finish_text, raw_text, stop_token_ids, stops_in

__all__ = ["CleanStreamer", "Decoder", "Row", "Sampling", "decode", "encode_prompts", "finish_text",
           "load_for_generation", "pick", "raw_text", "row_seed", "stop_token_ids", "stops_in"]
