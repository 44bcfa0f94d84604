"""The runtime over a real exported model: provider choice, cache handling, errors that name the file."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.runtime import (
    CPU,
    CudaUnavailableError,
    ModelDirError,
    Runtime,
    RuntimeOptions,
    cuda_usable,
)

no_cuda = pytest.mark.skipif(cuda_usable(), reason="checks the fallback on a machine without a usable GPU")


@pytest.fixture(scope="module")
def rt(model_dir: Path) -> Runtime:
    return Runtime(model_dir, RuntimeOptions(device="cpu"))


@pytest.fixture
def broken_dir(model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


def test_loads_on_cpu_and_warms_up(rt: Runtime) -> None:
    assert rt.provider == CPU
    assert rt.warmup_seconds > 0
    assert rt.info.n_layer == 2 and rt.info.max_seq_len == 64


@no_cuda
def test_cuda_requested_without_a_gpu_falls_back_with_one_warning(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        rt = Runtime(model_dir, RuntimeOptions(device="cuda", warmup=False))
    assert rt.provider == CPU
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDA" in warnings[0].getMessage()


def test_cuda_sessions_ask_for_fp32_arithmetic(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA provider's options as a session is made with them: TF32 off, so fp32 graphs agree with the CPU."""
    import service.runtime as runtime

    asked: list[Any] = []
    for device_id in (0, 1):
        rt = Runtime(model_dir, RuntimeOptions(device="cpu", device_id=device_id, warmup=False))
        with monkeypatch.context() as m:
            m.setattr(runtime.ort, "InferenceSession", lambda path, so, providers: asked.append(providers))
            rt._session("encode", want_cuda=True)
    (name, opts), fallback = asked[0]
    assert name == "CUDAExecutionProvider" and fallback == "CPUExecutionProvider"
    assert opts["use_tf32"] == 0
    # device 0 is the provider's default, left unnamed: naming it draws a warning from ONNX Runtime 1.31 per session
    assert "device_id" not in opts and asked[1][0][1]["device_id"] == 1


@no_cuda
def test_cuda_required_without_a_gpu_fails_at_start(model_dir: Path) -> None:
    with pytest.raises(CudaUnavailableError, match="CUDA required"):
        Runtime(model_dir, RuntimeOptions(device="cuda", require_cuda=True))


@pytest.mark.gpu
def test_cuda_takes_the_sessions_when_usable(model_dir: Path) -> None:
    rt = Runtime(model_dir, RuntimeOptions(device="cuda", require_cuda=True))
    assert rt.provider == "CUDAExecutionProvider"
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in rt.sessions.values())


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="device"):
        RuntimeOptions(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contradicts"):
        RuntimeOptions(device="cpu", require_cuda=True)


@pytest.mark.parametrize("name", ["decoder.onnx", "tokenizer.json", "config.json", "attention.onnx"])
def test_missing_file_is_named(broken_dir: Path, name: str) -> None:
    (broken_dir / name).unlink()
    with pytest.raises(ModelDirError, match=name.replace(".", r"\.")):
        Runtime(broken_dir, RuntimeOptions(device="cpu", warmup=False))


@pytest.mark.parametrize("name", ["encode.onnx", "config.json", "tokenizer.json"])
def test_corrupt_file_is_named(broken_dir: Path, name: str) -> None:
    path = broken_dir / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])  # truncated mid-write
    with pytest.raises(ModelDirError, match=name.replace(".", r"\.")):
        Runtime(broken_dir, RuntimeOptions(device="cpu", warmup=False))


@pytest.mark.parametrize("name", ["encode.onnx", "decoder_step_int8.onnx", "tokenizer.json", "decoder_attn.onnx"])
def test_a_file_whose_bytes_changed_is_refused_by_name_before_it_is_read(broken_dir: Path, name: str) -> None:
    """A byte flipped in a graph may still parse, and serve other weights: the digest export recorded
    finds it, and a file cut short is told by its size."""
    path = broken_dir / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    options = RuntimeOptions(device="cpu", variant="int8" if "int8" in name else "fp32", warmup=False)
    with pytest.raises(ModelDirError, match=re.escape(f"{name}: not the bytes export wrote (its SHA-256 differs)")):
        Runtime(broken_dir, options)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(ModelDirError, match=re.escape(f"{name}: 100 bytes, where export wrote {len(data)}")):
        Runtime(broken_dir, options)


def test_a_directory_exported_before_digests_were_recorded_loads(
    broken_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = json.loads((broken_dir / "config.json").read_text())
    del cfg["files"]
    (broken_dir / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.INFO, "service.runtime"):
        assert Runtime(broken_dir, RuntimeOptions(device="cpu", warmup=False)).info.files is None
    assert any("records no file digests" in r.getMessage() for r in caplog.records)
    # unless digests are required: then it is refused, saying why
    with pytest.raises(ModelDirError, match=re.escape("config.json: records no file digests, and they are required")):
        Runtime(broken_dir, RuntimeOptions(device="cpu", warmup=False, require_digests=True))
    graph = broken_dir / "encode.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])  # then ONNX Runtime is what finds a file cut short
    with pytest.raises(ModelDirError, match=r"encode\.onnx: ONNX Runtime cannot load it"):
        Runtime(broken_dir, RuntimeOptions(device="cpu", warmup=False))


@pytest.mark.parametrize(
    ("files", "says"),
    [
        ("all of them", "'files' is not an object"),
        ({"encode.onnx": {"bytes": "9", "sha256": "ab"}}, "sha256 (64 hex"),
        ({}, "tokenizer.json: not among the files config.json records"),  # a file added after the export
    ],
)
def test_a_malformed_record_of_files_is_refused(broken_dir: Path, files: object, says: str) -> None:
    cfg = json.loads((broken_dir / "config.json").read_text())
    cfg["files"] = files
    (broken_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match=re.escape(says)):
        Runtime(broken_dir, RuntimeOptions(device="cpu", warmup=False))


def test_config_of_another_format_is_refused(broken_dir: Path) -> None:
    cfg = json.loads((broken_dir / "config.json").read_text())
    cfg["format"] = 99
    (broken_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="format 99"):
        Runtime(broken_dir, RuntimeOptions(device="cpu", warmup=False))


def test_int8_variant_runs_the_int8_graphs(model_dir: Path, rt: Runtime) -> None:
    q = Runtime(model_dir, RuntimeOptions(device="cpu", variant="int8", warmup=False))
    assert Path(q.sessions["decoder"]._model_path).name == "decoder_int8.onnx"
    assert Path(q.sessions["decoder_step"]._model_path).name == "decoder_step_int8.onnx"
    ids = np.array([[5, 6, 7, 8]])
    a = rt.encode(ids, np.ones_like(ids)).pooled_mean
    b = q.encode(ids, np.ones_like(ids)).pooled_mean
    assert np.allclose(a, b, atol=0.1) and not np.array_equal(a, b)


def _rand_ids(rt: Runtime, *shape: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, rt.info.vocab_size, shape)


@pytest.mark.parametrize("fused", [True, False], ids=["decoder_step", "decoder"])
def test_cached_steps_equal_one_full_pass(rt: Runtime, fused: bool) -> None:
    ids = _rand_ids(rt, 1, 12)
    full, _ = rt.decode(ids, np.ones_like(ids))  # no past: an empty cache
    cache = rt.new_cache(3)  # three slots, two of them left free
    first = rt.decode_step(cache, np.pad(ids[:, :5], ((0, 2), (0, 0))), np.pad(np.ones((1, 5)), ((0, 2), (0, 0))))
    assert cache.lengths.tolist() == [5, 0, 0]
    steps = [first[0]]
    for t in range(5, 12):
        tok = np.zeros((3, 1), np.int64)
        tok[0, 0] = ids[0, t]
        steps.append(rt.decode_step(cache, tok, np.array([[1], [0], [0]]), fused)[0])
    np.testing.assert_allclose(np.concatenate(steps, 0), full[0], atol=1e-4)
    assert cache.lengths.tolist() == [12, 0, 0]


def test_slots_of_different_lengths_do_not_disturb_each_other(rt: Runtime) -> None:
    a, b = _rand_ids(rt, 1, 9)[0], _rand_ids(rt, 1, 4)[0] + 1
    alone_b, _ = rt.decode(b[None], np.ones((1, 4)))
    cache = rt.new_cache(2)
    rt.decode_step(cache, a[None, :6].repeat(2, 0), np.array([[1] * 6, [0] * 6]))  # slot 0 first
    ids = np.zeros((2, 4), np.int64)
    ids[0, :3], ids[1] = a[6:], b
    logits = rt.decode_step(cache, ids, np.array([[1, 1, 1, 0], [1, 1, 1, 1]]))  # slot 1 joins
    np.testing.assert_allclose(logits[1], alone_b[0], atol=1e-4)
    assert cache.lengths.tolist() == [9, 4]
    cache.free(0)
    assert cache.attention_mask(np.ones((2, 1)))[0, : cache.max_len].sum() == 0


def _filled_caches(rt: Runtime, lengths: list[int]) -> tuple[Any, Any]:
    """Two host caches with the same random contents and lengths."""
    a, b = rt.new_cache(len(lengths)), rt.new_cache(len(lengths))
    a.data[:] = np.random.default_rng(3).standard_normal(a.data.shape)
    b.data[:] = a.data
    a.lengths[:] = b.lengths[:] = lengths
    return a, b


def test_step_graph_appends_in_place_as_the_decoder_graph_does(rt: Runtime) -> None:
    """Rows of different lengths, one sitting the step out and one free: the fused step gives the
    decoder graph's logits and leaves the same cache, written into the cache's own array."""
    fused, plain = _filled_caches(rt, [7, 3, 0, 12])
    data = fused.data
    ids = _rand_ids(rt, 4, 1)
    mask = np.array([[1], [0], [0], [1]])
    want = rt.decode_step(plain, ids, mask, fused=False)
    got = rt.decode_step(fused, ids, mask)
    assert fused.bindings, "the step graph was not used"
    assert fused.data is data and fused.lengths.tolist() == plain.lengths.tolist() == [8, 3, 0, 13]
    np.testing.assert_allclose(got[[0, 3]], want[[0, 3]], atol=1e-4)
    for s, n in enumerate(plain.lengths):  # what lies past a row's length is never read
        np.testing.assert_allclose(fused.data[:, :, s, :, :n], plain.data[:, :, s, :, :n], atol=1e-5)
    again = rt.decode_step(fused, ids, mask)  # the second step reuses the binding, and its logits are its own
    assert not np.array_equal(again, got) and len(fused.bindings) == 1


def test_a_full_slot_sitting_out_makes_the_step_take_the_decoder_graph(rt: Runtime) -> None:
    M = rt.info.max_seq_len
    fused, plain = _filled_caches(rt, [M, 5])
    ids, mask = _rand_ids(rt, 2, 1), np.array([[0], [1]])
    want = rt.decode_step(plain, ids, mask, fused=False)
    got = rt.decode_step(fused, ids, mask)
    assert not fused.bindings  # the fused graph would have written past the full slot's end
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(fused.data, plain.data)


def test_a_model_directory_without_the_step_graph_still_decodes(
    broken_dir: Path, rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    config = json.loads((broken_dir / "config.json").read_text())
    del config["graphs"]["decoder_step"]  # as an older export wrote it
    (broken_dir / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="service.runtime"):
        old = Runtime(broken_dir, RuntimeOptions(device="cpu", warmup=False))
    assert "decoder_step" not in old.sessions and "export again" in caplog.text
    ids, one = _rand_ids(rt, 1, 1), np.ones((1, 1), np.int64)
    a, b = old.new_cache(1), rt.new_cache(1)
    np.testing.assert_allclose(old.decode_step(a, ids, one), rt.decode_step(b, ids, one), atol=1e-4)
    assert not a.bindings and b.bindings


def test_the_step_graph_takes_its_own_thread_count(model_dir: Path) -> None:
    def threads(opts: RuntimeOptions) -> dict[str, int]:
        r = Runtime(model_dir, opts)
        return {g: s.get_session_options().intra_op_num_threads for g, s in r.sessions.items()}

    one = threads(RuntimeOptions(device="cpu", intra_op_threads=2, step_threads=1, warmup=False))
    assert one["decoder_step"] == 1 and one["decoder"] == one["encode"] == 2
    same = threads(RuntimeOptions(device="cpu", intra_op_threads=2, warmup=False))
    assert same["decoder_step"] == 2
    with pytest.raises(ValueError):
        RuntimeOptions(step_threads=-1)


def test_a_full_context_is_refused_before_running(rt: Runtime) -> None:
    cache = rt.new_cache(1)
    cache.lengths[:] = rt.info.max_seq_len
    with pytest.raises(ValueError, match="context full"):
        rt.decode_step(cache, np.ones((1, 1), np.int64), np.ones((1, 1), np.int64))


def test_on_device_cache_append_graph_matches_the_host_write(model_dir: Path, rt: Runtime) -> None:
    """The kv_write graph the CUDA path uses, run here on CPU against KVCache.write."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_dir / "kv_write.onnx"), providers=["CPUExecutionProvider"])
    cache = rt.new_cache(3)
    rng = np.random.default_rng(0)
    cache.data[:] = rng.standard_normal(cache.data.shape)
    cache.lengths[:] = [4, 0, 10]
    new_kv = [rng.standard_normal((3, 2, 3, 16)).astype(np.float32) for _ in range(4)]
    counts = np.array([3, 2, 0])
    (updated,) = sess.run(
        None, {"cache": cache.data.copy(), "new": np.stack(new_kv).reshape(2, 2, 3, 2, 3, 16), "start": cache.lengths}
    )
    cache.write(new_kv, counts)
    # the graph also writes the padding entries past each slot's count: compare the real positions only
    for s, n in enumerate(cache.lengths):
        np.testing.assert_array_equal(updated[:, :, s, :, :n], cache.data[:, :, s, :, :n])


@pytest.mark.gpu
def test_device_cache_steps_equal_the_host_cache(model_dir: Path, rt: Runtime) -> None:
    from service.runtime import DeviceKVCache

    gpu = Runtime(model_dir, RuntimeOptions(device="cuda", require_cuda=True))
    ids = _rand_ids(rt, 2, 10)
    host, dev = rt.new_cache(2), gpu.new_cache(2)
    assert isinstance(dev, DeviceKVCache) and dev.current.device_name().lower() == "cuda"
    mask = np.array([[1] * 6 + [0] * 4, [1] * 10])
    np.testing.assert_allclose(gpu.decode_step(dev, ids, mask), rt.decode_step(host, ids, mask), atol=1e-3)
    for _ in range(5):
        tok = ids[:, :1]
        np.testing.assert_allclose(
            gpu.decode_step(dev, tok, np.ones((2, 1), np.int64)),
            rt.decode_step(host, tok, np.ones((2, 1), np.int64)),
            atol=1e-3,
        )
    assert dev.lengths.tolist() == host.lengths.tolist() == [11, 15]


def test_cpu_threads_are_as_set_else_one_a_usable_core(rt: Runtime, model_dir: Path) -> None:
    assert rt.cpu_threads == len(os.sched_getaffinity(0))
    assert Runtime(model_dir, RuntimeOptions(device="cpu", intra_op_threads=3, warmup=False)).cpu_threads == 3
