"""The model directory's layout: what ``attnserve export`` writes and the runtime reads.

One module for both sides, so that a graph's name or the format's version is written once.
Plain constants and functions: importing it costs nothing and needs neither torch nor
ONNX Runtime.
"""

from __future__ import annotations

FORMAT_VERSION = 1  # config.json's "format"; a server refuses a directory of another
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
REPORT = "export_report.json"

GRAPHS = ("encode", "decoder", "attention")  # every directory has these
OPTIONAL_GRAPHS = ("decoder_attn",)  # generation with attention; a directory without it serves the rest
STEP_GRAPH = "decoder_step"  # CPU one-token steps with the cache appended in place; the decoder does without it
KV_WRITE = "kv_write"  # the CUDA cache append
EXPORTED = (*GRAPHS, KV_WRITE, *OPTIONAL_GRAPHS, STEP_GRAPH)  # what export writes, in fp32
INT8_GRAPHS = ("encode", "decoder", STEP_GRAPH)  # the CPU variant: what CPU serving runs
FP16_GRAPHS = ("encode", "decoder", "attention")  # the CUDA variant
VARIANTS = ("fp32", "int8", "fp16")


def graph_file(graph: str) -> str:
    return f"{graph}.onnx"


def variant_key(graph: str, variant: str) -> str:
    """config.json's "graphs" key of a graph's variant ("decoder_int8"); fp32 graphs go by their own name."""
    return graph if variant == "fp32" or graph == KV_WRITE else f"{graph}_{variant}"
