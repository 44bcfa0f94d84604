"""Export end to end on a tiny model: graphs, metadata, parity, variants, and failing loudly."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from export import onnx_export
from export.graphs import export_decoder_step, step_graph_problem
from export.onnx_export import ExportError, export_model
from export.parity import TOLERANCE, _diff, check_parity, step_graph_agreement
from model.config import ModelConfig
from model.train import load_checkpoint
from model.transformer import Transformer
from service.runtime import CUDA, Runtime, RuntimeOptions

GRAPH_FILES = ("encode.onnx", "decoder.onnx", "attention.onnx")


def test_model_directory_is_self_contained(model_dir: Path) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert {*GRAPH_FILES, "tokenizer.json", "config.json", "export_report.json"} <= names
    assert {"encode_int8.onnx", "decoder_int8.onnx", "decoder_fp16.onnx"} <= names
    assert not any(n.endswith(".pt") for n in names)  # no PyTorch file: the server never needs torch
    config = json.loads((model_dir / "config.json").read_text())
    assert config["limits"]["max_seq_len"] == config["model"]["max_seq_len"] == 64
    assert config["graphs"]["decoder"] == "decoder.onnx"


def test_config_records_each_files_size_and_digest(model_dir: Path) -> None:
    files = json.loads((model_dir / "config.json").read_text())["files"]
    assert set(files) == {p.name for p in model_dir.iterdir()} - {"config.json", "export_report.json"}
    for name, entry in files.items():
        data = (model_dir / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


@pytest.mark.parametrize(
    "file",
    [
        *GRAPH_FILES,
        "decoder_attn.onnx",
        "decoder_step.onnx",
        "decoder_int8.onnx",
        "decoder_step_int8.onnx",
        "attention_fp16.onnx",
    ],
)
def test_graphs_pass_the_full_checker_and_carry_the_config(model_dir: Path, file: str) -> None:
    onnx.checker.check_model(str(model_dir / file), full_check=True)
    model = onnx.load(str(model_dir / file))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["attnserve.config"])["model"]["n_layer"] == 2
    assert props["attnserve.graph"] == file.removesuffix(".onnx")
    assert model.opset_import[0].version >= 17


def test_graphs_have_dynamic_batch_and_sequence_axes(model_dir: Path) -> None:
    dec = onnx.load(str(model_dir / "decoder.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in dec.graph.input}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["past_key_0"] == ["batch", 2, "past", 16]
    assert [o.name for o in dec.graph.output][:3] == ["logits", "new_key_0", "new_value_0"]
    att = onnx.load(str(model_dir / "attention.onnx"))
    assert [o.name for o in att.graph.output] == ["attentions"]
    enc = onnx.load(str(model_dir / "encode.onnx"))
    assert [o.name for o in enc.graph.output] == ["last_hidden_state", "pooled_mean", "pooled_last"]


def test_step_graph_fuses_attention_and_appends_in_place(model_dir: Path) -> None:
    step = onnx.load(str(model_dir / "decoder_step.onnx"))
    gqa = [n for n in step.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.domain == "com.microsoft" for n in gqa)  # one per layer
    attrs = {a.name: a.i for a in gqa[0].attribute}
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 1  # RoPE on pairs, as the model turns them
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in step.graph.input}
    assert dims["input_ids"] == ["batch", 1] and dims["past_lengths"] == ["batch"]
    # each present output has its past input's shape: the runtime binds both to the cache's memory
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in step.graph.output}
    assert outs["present_key_1"] == dims["past_key_1"] == ["batch", 2, "max_len", 16]


def test_report_shows_parity_within_bounds(export_report: dict[str, Any]) -> None:
    parity = export_report["parity"]
    for key in ("encode_hidden", "encode_pooled_mean", "encode_pooled_last", "attention_probs", "decoder_logits"):
        assert parity[key]["ok"] and parity[key]["max_abs_diff"] <= TOLERANCE, (key, parity[key])
    for key in ("cached_decoding", "cached_decoding_step_graph"):  # steps through the decoder, then the step graph
        assert parity[key]["tokens_equal"] and parity[key]["steps"] == 32, (key, parity[key])
        assert parity[key]["max_abs_diff"] <= TOLERANCE, (key, parity[key])


def test_int8_variant_reports_its_loss_and_speed(export_report: dict[str, Any]) -> None:
    q = export_report["int8"]
    assert q["ok"] and q["relative_increase"] <= 0.02
    assert 0 < q["val_bits_per_byte_fp32"] < 8 and q["eval_tokens"] > 0
    assert q["speed_ms"]["int8"]["decode_step"] > 0
    steps = q["step_graph_vs_decoder"]  # generation's int8 step graph against the graph measured above
    assert steps["ok"] and steps["max_abs_diff"] <= steps["bound"] and steps["bound"] >= 1e-3
    assert 0 <= steps["picks_agree"] <= 2 * steps["steps"]


def test_int8_step_check_refuses_a_step_graph_that_decodes_wrongly(model_dir: Path) -> None:
    int8 = Runtime(model_dir, RuntimeOptions(device="cpu", variant="int8", warmup=False))
    fp32 = Runtime(model_dir, RuntimeOptions(device="cpu", warmup=False))
    assert step_graph_agreement(int8, fp32, 1e-3)["ok"]
    decode_step = int8.decode_step

    def off_by_one(cache: Any, ids: np.ndarray, mask: np.ndarray, fused: bool = True) -> np.ndarray:
        logits = decode_step(cache, ids, mask, fused)
        return np.roll(logits, 1, axis=-1) if fused and ids.shape[1] == 1 else logits  # each logit one id off

    int8.decode_step = off_by_one  # type: ignore[method-assign]
    wrong = step_graph_agreement(int8, fp32, 1e-3)
    assert not wrong["ok"] and wrong["max_abs_diff"] > wrong["bound"]


def test_int8_step_check_passes_a_step_graph_within_int8s_own_error(model_dir: Path) -> None:
    """As when one activation crosses a quantization step: from some step on, every logit moves a little."""
    int8 = Runtime(model_dir, RuntimeOptions(device="cpu", variant="int8", warmup=False))
    fp32 = Runtime(model_dir, RuntimeOptions(device="cpu", warmup=False))
    bound = step_graph_agreement(int8, fp32, 1e-3)["bound"]
    decode_step = int8.decode_step
    steps = 0

    def flipped(cache: Any, ids: np.ndarray, mask: np.ndarray, fused: bool = True) -> np.ndarray:
        nonlocal steps
        logits = decode_step(cache, ids, mask, fused)
        if fused and ids.shape[1] == 1:
            steps += 1
            if steps > 20:
                logits = logits + np.float32(bound / 2) * np.sign(np.sin(np.arange(logits.shape[-1])))
        return logits

    int8.decode_step = flipped  # type: ignore[method-assign]
    moved = step_graph_agreement(int8, fp32, 1e-3)
    assert moved["ok"] and bound / 4 < moved["max_abs_diff"] <= moved["bound"]


def test_fp16_variant_says_whether_it_was_checked(export_report: dict[str, Any]) -> None:
    f = export_report["fp16"]
    if f["checked"]:
        assert f["ok"]
    else:
        assert "not checked" in f["reason"]


def test_parity_check_catches_a_different_model(tiny_checkpoint: Path, model_dir: Path) -> None:
    model, _, _ = load_checkpoint(tiny_checkpoint / "checkpoint.pt")
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight.add_(0.05)
    result = check_parity(model, Runtime(model_dir, RuntimeOptions(device="cpu", warmup=False)))
    assert not result["encode_hidden"]["ok"] and not result["decoder_logits"]["ok"]


def test_a_relative_bound_scales_with_the_reference_and_still_catches_a_different_model(
    tiny_checkpoint: Path, model_dir: Path
) -> None:
    """fp16's bound: the tolerance times the reference's largest magnitude, never below the tolerance."""
    ref = np.array([10.0, -40.0])
    within = _diff(ref + 0.15, ref, 5e-3, relative=True)
    assert within["ok"] and within["bound"] == pytest.approx(0.2) and within["max_abs_diff"] == pytest.approx(0.15)
    assert not _diff(ref + 0.25, ref, 5e-3, relative=True)["ok"]
    assert not _diff(np.array([0.5]) + 0.01, np.array([0.5]), 5e-3, relative=True)["ok"]  # bound 5e-3, not 2.5e-3
    model, _, _ = load_checkpoint(tiny_checkpoint / "checkpoint.pt")
    rt = Runtime(model_dir, RuntimeOptions(device="cpu", warmup=False))
    same = check_parity(model, rt, tolerance=5e-3, relative=True)
    assert same["relative"] and all(same[k]["ok"] and "bound" in same[k] for k in ("decoder_logits", "cached_decoding"))
    c = same["cached_decoding"]  # fed PyTorch's tokens, the runtime's own picks still all agree
    assert c["tokens_equal"] and c["picks_agree"] == 2 * c["steps"]
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight.add_(0.05)
    off = check_parity(model, rt, tolerance=5e-3, relative=True)
    assert not any(off[k]["ok"] for k in ("encode_hidden", "decoder_logits", "cached_decoding"))


def test_failed_parity_fails_the_export_and_publishes_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = onnx_export.check_parity
    monkeypatch.setattr(onnx_export, "check_parity", lambda m, rt, **kw: real(m, rt, tolerance=0.0))
    out = tmp_path / "broken"
    with pytest.raises(ExportError, match=r"encode_hidden|decoder_logits"):
        export_model(tiny_checkpoint, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no half-written directory left behind either


def test_model_directory_loads_without_torch(model_dir: Path) -> None:
    code = f"""
import sys, numpy as np
from service.runtime import Runtime
rt = Runtime({str(model_dir)!r})
out = rt.encode(np.array([[1, 2, 3]]), np.array([[1, 1, 1]]))
assert out.pooled_mean.shape == (1, 32), out.pooled_mean.shape
print('torch' in sys.modules, rt.provider)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "False"


@pytest.mark.gpu
def test_fp16_parity_on_cuda(export_report: dict[str, Any], model_dir: Path) -> None:
    assert export_report["fp16"]["checked"] and export_report["fp16"]["ok"], export_report["fp16"]
    rt = Runtime(model_dir, RuntimeOptions(device="cuda", require_cuda=True, variant="fp16"))
    assert rt.provider == CUDA


@pytest.mark.parametrize("positional", ["rope", "sinusoidal", "learned"])
@torch.no_grad()
def test_step_graph_decodes_as_the_model_does_for_every_positional_encoding(positional: str, tmp_path: Path) -> None:
    """decoder_step of an untrained model of each kind (rotary inside the fused node, or added
    positions outside it) against the PyTorch model on the whole sequence; rows of different lengths."""
    import numpy as np
    import onnxruntime as ort

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=64, d_ff=64, max_seq_len=24, positional=positional)
    model = Transformer(cfg).eval()
    export_decoder_step(model, str(tmp_path / "step.onnx"))
    assert step_graph_problem(str(tmp_path / "step.onnx"), cfg) is None
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    seqs = [torch.randint(97, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4)]
    feeds: dict[str, np.ndarray] = {"past_lengths": np.array([8, 3], np.int32)}
    feeds["input_ids"] = np.array([[int(s[-1])] for s in seqs])
    for i in range(cfg.n_layer):
        for j, kind in enumerate(("key", "value")):
            cache = np.zeros((2, cfg.n_head, cfg.max_seq_len, cfg.head_dim), np.float32)
            for b, s in enumerate(seqs):  # each row's past: the model's own keys/values of all but its last token
                cache[b, :, : len(s) - 1] = model(s[None, :-1]).new_kv[i][j][0].numpy()
            feeds[f"past_{kind}_{i}"] = cache
    logits, *present = session.run(None, feeds)
    for b, s in enumerate(seqs):
        want = model(s[None]).logits[0, -1].numpy()
        np.testing.assert_allclose(logits[b, 0], want, atol=1e-4)
        new_key = model(s[None]).new_kv[1][0][0, :, -1].numpy()  # layer 1's key of the new token
        np.testing.assert_allclose(present[2][b, :, len(s) - 1], new_key, atol=1e-4)


def test_a_step_graph_onnx_runtime_cannot_run_is_found_before_publishing(tmp_path: Path) -> None:
    """GroupQueryAttention's rotary kernel wants a head size that is a multiple of 16: with 8 the
    probe says why, and export leaves the optional graph out (decode steps take the decoder graph)."""
    cfg = ModelConfig(vocab_size=97, n_layer=1, n_head=4, d_model=32, d_ff=64, max_seq_len=24, positional="rope")
    export_decoder_step(Transformer(cfg).eval(), str(tmp_path / "step.onnx"))
    problem = step_graph_problem(str(tmp_path / "step.onnx"), cfg)
    assert problem is not None and "head_size" in problem


def test_export_leaves_out_a_step_graph_onnx_runtime_cannot_run(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_export, "step_graph_problem", lambda path, cfg: "head_size shall be a multiple of 16")
    out = tmp_path / "model"
    report = export_model(tiny_checkpoint, out, int8=True)
    assert report["decoder_step"] == {"exported": False, "reason": "head_size shall be a multiple of 16"}
    assert not list(out.glob("decoder_step*"))
    assert "decoder_step" not in json.loads((out / "config.json").read_text())["graphs"]
    rt = Runtime(out, RuntimeOptions(device="cpu", warmup=False))
    assert "decoder_step" not in rt.sessions
    assert report["parity"]["decode_tokens_equal"] and "cached_decoding_step_graph" not in report["parity"]


def test_a_model_of_a_short_context_exports_starts_and_serves(corpus: list, tmp_path: Path) -> None:
    """Warm-up shapes and everything else fit a context of 16 tokens; the published directory is world-readable
    (a server running as another user, a container's, reads it through a read-only mount)."""
    import dataclasses
    import stat

    from model.config import preset
    from model.train import train

    tiny = preset("tiny")
    cfg = dataclasses.replace(
        tiny, model=dataclasses.replace(tiny.model, max_seq_len=16), train=dataclasses.replace(tiny.train, seq_len=16)
    )
    train(cfg, tmp_path / "ckpt", corpus, steps=3, progress=False)
    out = tmp_path / "model"
    export_model(tmp_path / "ckpt", out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    rt = Runtime(out, RuntimeOptions(device="cpu"))  # warms up: every shape within 16 tokens
    assert rt.warmup_seconds > 0
    cache = rt.new_cache(1)
    ids = np.ones((1, 14), np.int64)
    rt.decode_step(cache, ids, np.ones_like(ids))
    logits = rt.decode_step(cache, ids[:, :1], np.ones_like(ids[:, :1]))
    assert logits.shape == (1, 1, 384)
