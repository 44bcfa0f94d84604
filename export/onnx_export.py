"""``attnserve export --checkpoint DIR --out MODEL_DIR [--int8] [--fp16]``.

Turns a training checkpoint into a self-contained model directory: the ONNX graphs,
``tokenizer.json``, ``config.json`` (shape, limits, graph files) and ``export_report.json``
(parity and variant figures). Parity of ONNX Runtime against PyTorch is checked before the
directory is published; when it fails, export fails and leaves no model directory behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from export.graphs import (
    OPSET,
    export_attention,
    export_decoder,
    export_decoder_step,
    export_encode,
    export_kv_write,
    new_kv_names,
    past_names,
    step_graph_problem,
)
from export.parity import TOLERANCE, check_parity, decoder_bits_per_byte, step_graph_agreement, time_decoder
from model.train import VALIDATION_FILE, load_checkpoint
from model.transformer import Transformer
from service.model_dir import (
    CONFIG,
    EXPORTED,
    FILES,
    FORMAT_VERSION,
    FP16_GRAPHS,
    INT8_GRAPHS,
    REPORT,
    STEP_GRAPH,
    TOKENIZER,
    graph_file,
    manifest,
    variant_key,
)
from service.runtime import CUDA, Runtime, RuntimeOptions, cuda_usable

log = logging.getLogger(__name__)

INT8_MAX_LOSS_INCREASE = 0.02  # int8 may cost at most 2% in validation bits per byte
# fp16 against PyTorch fp32, relative to the reference's largest magnitude: fp16 keeps 11 significant bits
# (a step of 2^-10 of a number), and rounding at every op of every layer adds up to a few such steps
FP16_TOLERANCE = 5e-3
# int8 decoder_step against int8 decoder: the same quantized matrices, so they differ by the attention
# kernels' arithmetic order, which may move an activation across a quantization step. They may differ
# by as much as int8 differs from fp32 on the same tokens, and always by this much
INT8_STEP_TOLERANCE = 1e-3


class ExportError(Exception):
    """The exported graphs do not match the PyTorch model (or a variant fails its bound)."""


def _stamp_metadata(path: Path, graph: str, config: dict[str, Any]) -> None:
    """Store the model's configuration in the graph itself, so a lone .onnx file still says what it is."""
    model = onnx.load(str(path))
    props = {
        "attnserve.graph": graph,
        "attnserve.config": json.dumps(config, sort_keys=True),
        "attnserve.name": config["name"],
        "attnserve.version": config["version"],
    }
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "attnserve"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _validation_windows(checkpoint_dir: Path, tokenizer: Any, seq_len: int, max_tokens: int) -> list[np.ndarray]:
    from model.tokenizer import EOT

    path = checkpoint_dir / VALIDATION_FILE
    if not path.is_file():
        raise ExportError(f"{path}: missing; the int8 variant is measured on the held-out text training wrote")
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for doc in path.read_text(encoding="utf-8").split(EOT):
        ids += [*tokenizer.encode(doc, add_special_tokens=False).ids, eot]
    ids = ids[: max_tokens + 1]
    n = (len(ids) - 1) // seq_len
    return [np.asarray(ids[i * seq_len : i * seq_len + seq_len + 1], np.int64) for i in range(n)]


def export_model(
    checkpoint_dir: Path,
    out_dir: Path,
    *,
    int8: bool = False,
    fp16: bool = False,
    name: str = "default",
    int8_eval_tokens: int = 32768,
) -> dict[str, Any]:
    """Export, verify and publish a model directory; returns the export report."""
    t0 = time.perf_counter()
    model, cfg, state = load_checkpoint(checkpoint_dir / "checkpoint.pt")
    digest = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().cpu().numpy().tobytes())
    version = f"{state['step']}-{digest.hexdigest()[:12]}"

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shutil.copy(checkpoint_dir / TOKENIZER, work / TOKENIZER)
        from tokenizers import Tokenizer as HFTokenizer

        from model.tokenizer import EOT

        hf_tok = HFTokenizer.from_file(str(work / TOKENIZER))
        graphs = {graph: graph_file(graph) for graph in EXPORTED}
        config: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "name": name,
            "version": version,
            "model": cfg.to_dict()["model"],
            "limits": {"max_seq_len": cfg.model.max_seq_len},
            "eot_token_id": hf_tok.token_to_id(EOT),
            "tokenizer": TOKENIZER,
            "graphs": graphs,
            "decoder": {
                "past_inputs": past_names(cfg.model.n_layer),
                "new_outputs": new_kv_names(cfg.model.n_layer),
                "cache_layout": "per layer (batch, heads, positions, head_dim); P = 0 for a prefill",
                "step_graph": "decoder_step: one token per row, GroupQueryAttention (com.microsoft) appending "
                "to past in place; present_* are bound to the past_* memory",
            },
            "training": {
                "steps": state["step"],
                "train_seq_len": cfg.train.seq_len,
                "checkpoint_dir": str(checkpoint_dir.resolve()),
            },
            "opset": OPSET,
        }
        with torch.no_grad():
            export_encode(model, str(work / graphs["encode"]))
            export_decoder(model, str(work / graphs["decoder"]))
            export_attention(model, str(work / graphs["attention"]))
            export_kv_write(cfg.model, str(work / graphs["kv_write"]))
            export_decoder(model, str(work / graphs["decoder_attn"]), with_attention=True)
            export_decoder_step(model, str(work / graphs["decoder_step"]))
        step_problem = step_graph_problem(str(work / graphs["decoder_step"]), cfg.model)
        if step_problem is not None:  # an optional graph: decode steps then run the decoder graph
            log.warning("no decoder_step graph for this model: %s", step_problem)
            (work / graphs.pop("decoder_step")).unlink()
            del config["decoder"]["step_graph"]
        for graph, file in graphs.items():
            _stamp_metadata(work / file, graph, config)
        (work / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

        runtime = Runtime(work, RuntimeOptions(device="cpu", warmup=False))
        parity = check_parity(model, runtime)
        report: dict[str, Any] = {"name": name, "version": version, "opset": OPSET, "parity": parity}
        report["decoder_step"] = {"exported": step_problem is None, "reason": step_problem}
        failures = [k for k, v in parity.items() if isinstance(v, dict) and not v.get("ok", True)]

        windows = None
        if int8:
            windows = _validation_windows(checkpoint_dir, hf_tok, cfg.train.seq_len, int8_eval_tokens)
            report["int8"] = _int8_variant(work, config, windows, runtime)
            if not report["int8"]["ok"]:
                failures.append("int8")
        if fp16:
            report["fp16"] = _fp16_variant(work, config, model)
            if report["fp16"].get("ok") is False:
                failures.append("fp16")
        config[FILES] = manifest(work)  # what a server checks each file against before it loads it
        (work / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        report["export_seconds"] = round(time.perf_counter() - t0, 2)
        (work / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if failures:
            raise ExportError(f"export checks failed: {failures}; report: {json.dumps(report, indent=2)}")
        _publishable(work)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    log.info("exported %s %s to %s in %.1fs", name, version, out_dir, time.perf_counter() - t0)
    return report


def _publishable(directory: Path) -> None:
    """World-readable, as a published model is: the working folder came from mkdtemp (0700), and a server
    running as another user (a container's, with the directory mounted read-only) must read it."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _int8_variant(work: Path, config: dict[str, Any], windows: list[np.ndarray], fp32: Runtime) -> dict[str, Any]:
    """Dynamic int8 quantization (weights int8, activations quantized on the fly): the CPU variant."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = [g for g in INT8_GRAPHS if g in config["graphs"]]  # decoder_step may have been left out
    for graph in quantized:
        key = variant_key(graph, "int8")
        src, dst = work / graph_file(graph), work / graph_file(key)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        _stamp_metadata(dst, key, config)
        config["graphs"][key] = dst.name
    (work / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    int8 = Runtime(work, RuntimeOptions(device="cpu", variant="int8", warmup=False))
    base = decoder_bits_per_byte(fp32, windows)
    quant = decoder_bits_per_byte(int8, windows)
    increase = quant / base - 1.0
    speed = {v: time_decoder(rt) for v, rt in (("fp32", fp32), ("int8", int8))}
    # decoder_step_int8 serves generation; the bits-per-byte figure above came from decoder_int8
    steps: dict[str, Any] = {"ok": True, "checked": False}  # no step graph for this model
    if STEP_GRAPH in int8.sessions:
        steps = step_graph_agreement(int8, fp32, INT8_STEP_TOLERANCE)
    return {
        "ok": bool(increase <= INT8_MAX_LOSS_INCREASE) and steps["ok"],
        "step_graph_vs_decoder": steps,
        "val_bits_per_byte_fp32": base,
        "val_bits_per_byte_int8": quant,
        "relative_increase": increase,
        "bound": INT8_MAX_LOSS_INCREASE,
        "eval_tokens": int(sum(len(w) - 1 for w in windows)),
        "speed_ms": speed,
        "size_bytes": {g: (work / graph_file(variant_key(g, "int8"))).stat().st_size for g in quantized},
    }


def _fp16_variant(work: Path, config: dict[str, Any], model: Transformer) -> dict[str, Any]:
    """fp16 weights and arithmetic for CUDA; inputs and outputs stay fp32 so clients see no difference."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    for graph in FP16_GRAPHS:
        key = variant_key(graph, "fp16")
        src, dst = work / graph_file(graph), work / graph_file(key)
        converted = OnnxModel(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True))
        converted.topological_sort()  # the converter appends its input casts after their users
        onnx.save(converted.model, str(dst))
        _stamp_metadata(dst, key, config)
        config["graphs"][key] = dst.name
    (work / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if not cuda_usable():
        return {"checked": False, "reason": "no usable CUDA device on this machine; fp16 parity not checked"}
    rt = Runtime(work, RuntimeOptions(device="cuda", require_cuda=True, variant="fp16", warmup=False))
    assert rt.provider == CUDA
    result = check_parity(model, rt, tolerance=FP16_TOLERANCE, relative=True)
    ok = all(v.get("ok", True) for v in result.values() if isinstance(v, dict))
    return {
        "checked": True,
        "ok": ok,
        "provider": rt.provider,
        "tolerance": FP16_TOLERANCE,
        "relative": True,
        "parity": result,
    }


def summary(report: dict[str, Any]) -> str:
    lines = [f"model {report['name']} {report['version']} (opset {report['opset']})"]
    for k, v in report["parity"].items():
        if isinstance(v, dict) and "max_abs_diff" in v:
            lines.append(f"  parity {k:<26} max |diff| {v['max_abs_diff']:.2e}  (bound {TOLERANCE:g})")
    if "decode_tokens_equal" in report["parity"]:
        lines.append(
            f"  cached decoding: tokens equal over {report['parity']['decode_steps']} steps: "
            f"{report['parity']['decode_tokens_equal']}"
        )
    if "int8" in report:
        q = report["int8"]
        lines.append(
            f"  int8: {q['val_bits_per_byte_int8']:.4f} vs fp32 {q['val_bits_per_byte_fp32']:.4f} bits/byte "
            f"({q['relative_increase'] * 100:+.2f}%), decode step {q['speed_ms']['int8']['decode_step']:.3f} ms "
            f"vs {q['speed_ms']['fp32']['decode_step']:.3f} ms"
        )
    if "fp16" in report:
        f = report["fp16"]
        lines.append(f"  fp16: {'ok' if f.get('ok') else 'FAILED'}" if f["checked"] else f"  fp16: {f['reason']}")
    return "\n".join(lines)
