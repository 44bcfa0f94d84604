"""Execution layer: ONNX Runtime sessions over an exported model directory.

Plain numpy in, numpy out; no gRPC here and no torch anywhere in the import graph. Loads the
directory that ``attnserve export`` wrote, picks the execution provider (CUDA first when asked
for and usable, CPU otherwise), checks which provider really took each session, and warms
every graph up so the first request does not pay for it.

The key/value cache (``KVCache``) is preallocated per sequence slot, laid out per layer as
(slots, heads, max_len, head_dim), and handed to the graphs as it lies. On CPU a one-token
step runs the ``decoder_step`` graph, whose fused attention reads each row's filled positions
and appends the new key and value in place (its present outputs are bound to the cache's own
memory); other calls run the decoder graph, which returns only the new entries, written into
their slots here. No step copies the whole cache on CPU; on CUDA the cache never leaves the
device.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from service.model_dir import (
    CONFIG,
    FILES,
    FORMAT_VERSION,
    GRAPHS,
    KV_WRITE,
    OPTIONAL_GRAPHS,
    STEP_GRAPH,
    TOKENIZER,
    VARIANTS,
    sha256,
    variant_key,
)

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ModelDirError(Exception):
    """The model directory is missing a file, or a file in it is unreadable; the message names the file."""


class CudaUnavailableError(RuntimeError):
    """CUDA was required but no session could be placed on a CUDA device."""


@dataclass(frozen=True)
class RuntimeOptions:
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when usable, else CPU, quietly
    require_cuda: bool = False  # refuse to start on CPU when CUDA was asked for
    device_id: int = 0
    cuda_mem_limit_bytes: int = 0  # the CUDA memory arena's cap; 0 = no cap
    intra_op_threads: int = 0  # 0 = ONNX Runtime's default: one per physical core
    inter_op_threads: int = 1  # graphs here are chains; parallel branches gain nothing
    variant: Literal["fp32", "int8", "fp16"] = "fp32"  # int8 for CPU, fp16 for CUDA, when exported
    warmup: bool = True
    # ONNX Runtime's worker threads spin between runs: the lowest latency for back-to-back runs
    # in one process, but CPU taken from everything else (a server's event loop, above all)
    spin: bool = True
    # one-token steps on CPU through the decoder_step graph, where the model directory has it
    fused_step: bool = True
    # intra-op threads of that graph; 0 = intra_op_threads. A step is dozens of tiny kernels: a second
    # thread helps a little when it spins, and costs more than it gives when it must be woken each time
    step_threads: int = 0
    # refuse a directory whose config.json records no file digests, rather than load it unchecked
    require_digests: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be fp32, int8 or fp16, got {self.variant!r}")
        if self.require_cuda and self.device == "cpu":
            raise ValueError("require_cuda contradicts device=cpu")
        if min(self.intra_op_threads, self.inter_op_threads, self.cuda_mem_limit_bytes, self.step_threads) < 0:
            raise ValueError("thread counts and the memory limit must be >= 0")


@dataclass(frozen=True)
class ModelInfo:
    """What the model directory's config.json says, checked."""

    name: str
    version: str
    vocab_size: int
    n_layer: int
    n_head: int
    d_model: int
    head_dim: int
    max_seq_len: int
    positional: str
    eot_token_id: int
    graphs: dict[str, str]
    files: dict[str, tuple[int, str]] | None  # each file's size and SHA-256 as export wrote it (None: not recorded)
    raw: dict[str, Any] = field(repr=False)


@dataclass
class EncodeOutput:
    last_hidden_state: np.ndarray  # (B, T, d)
    pooled_mean: np.ndarray  # (B, d)
    pooled_last: np.ndarray  # (B, d)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelDirError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return data


def read_model_info(model_dir: Path) -> ModelInfo:
    path = model_dir / CONFIG
    raw = _read_json(path)
    try:
        if raw.get("format") != FORMAT_VERSION:
            raise ModelDirError(f"{path}: format {raw.get('format')!r}, this server reads {FORMAT_VERSION}")
        m = raw["model"]
        return ModelInfo(
            name=str(raw["name"]),
            version=str(raw["version"]),
            vocab_size=int(m["vocab_size"]),
            n_layer=int(m["n_layer"]),
            n_head=int(m["n_head"]),
            d_model=int(m["d_model"]),
            head_dim=int(m["d_model"]) // int(m["n_head"]),
            max_seq_len=int(m["max_seq_len"]),
            positional=str(m["positional"]),
            eot_token_id=int(raw["eot_token_id"]),
            graphs={str(k): str(v) for k, v in raw["graphs"].items()},
            files=_files(raw.get(FILES)),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelDirError(f"{path}: missing or malformed field ({e!r})") from e


def _files(recorded: Any) -> dict[str, tuple[int, str]] | None:
    """config.json's "files", as {name: (bytes, sha256)}; None for a directory exported before they were recorded."""
    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        raise TypeError(f"{FILES!r} is not an object")
    files = {}
    for name, entry in recorded.items():
        size, digest = entry["bytes"], entry["sha256"]
        if not isinstance(size, int) or not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"{FILES}.{name}: expected bytes (an integer) and sha256 (64 hex digits)")
        files[str(name)] = (size, digest.lower())
    return files


@functools.cache
def cuda_usable(device_id: int = 0) -> bool:
    """Whether ONNX Runtime can place a session on this CUDA device (not merely whether the build has CUDA)."""
    if CUDA not in ort.get_available_providers():
        return False
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # it prints what it cannot find; that is for the debug log
            ort.preload_dlls()  # the CUDA and cuDNN libraries from pip packages, where present
    except Exception:
        log.debug("preload_dlls failed", exc_info=True)
    log.debug("preload_dlls: %s", said.getvalue().strip())
    ort.set_default_logger_severity(4)  # a failed probe is an answer here, not an error to print
    try:
        ort.OrtValue.ortvalue_from_shape_and_type([1], np.float32, "cuda", device_id)
        return True
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(2)


class KVCache:
    """Preallocated keys and values for ``slots`` sequences: one array (layers, 2, slots, heads, max_len, head_dim).

    ``lengths[s]`` counts the tokens cached for slot s. Every decoder call sees every slot;
    a free slot is simply fully masked. Each layer's keys and values are contiguous views of
    the one array, handed to ONNX Runtime as they are; one indexed assignment per step
    writes the new entries of every layer.
    """

    def __init__(self, info: ModelInfo, slots: int, max_len: int | None = None) -> None:
        self.slots = slots
        self.max_len = max_len or info.max_seq_len
        self.data = np.zeros((info.n_layer, 2, slots, info.n_head, self.max_len, info.head_dim), np.float32)
        # np.zeros maps pages lazily: the first prefill into them paid ~20 ms of page faults (16 slots);
        # touching them all now costs ~1.5 ms, once, before any request waits on it
        self.data.fill(0.0)
        self.lengths = np.zeros(slots, np.int64)
        self.bindings: dict[tuple[int, int], StepBinding] = {}  # (session, rows) -> decoder_step bound here
        self._feeds = {
            f"past_{kind}_{i}": self.data[i, j] for i in range(info.n_layer) for j, kind in enumerate(("key", "value"))
        }

    def feeds(self, k: int | None = None) -> dict[str, np.ndarray]:
        """Each layer's keys and values of the first k slots (all by default): still contiguous views."""
        if k is None or k == self.slots:
            return self._feeds
        return {name: view[:k] for name, view in self._feeds.items()}

    def attention_mask(self, new_mask: np.ndarray) -> np.ndarray:
        """(k, max_len + T) for the first k = len(new_mask) slots: cached positions, then the new tokens' mask."""
        lengths = self.lengths[: len(new_mask)]
        cached = (np.arange(self.max_len)[None, :] < lengths[:, None]).astype(np.int64)
        return np.concatenate((cached, new_mask.astype(np.int64)), axis=1)

    def check_room(self, new_mask: np.ndarray) -> np.ndarray:
        """New real tokens of each of the first len(new_mask) slots; ValueError where one would overflow."""
        counts = new_mask.sum(axis=1, dtype=np.int64)
        lengths = self.lengths[: len(new_mask)]
        if int((lengths + counts).max()) > self.max_len:  # one reduction: this runs every decode step
            raise ValueError(f"context full: cached {lengths.tolist()} + new {counts.tolist()} > {self.max_len}")
        return counts

    def fill(self, slots: Sequence[int], new_kv: list[np.ndarray], counts: np.ndarray) -> None:
        """Put freshly prefilled sequences into empty slots: row i of new_kv (its first counts[i]
        entries) into slots[i]."""
        n_layer, _, _, nh, _, hs = self.data.shape
        new = np.stack(new_kv).reshape(n_layer, 2, len(slots), nh, -1, hs)
        for i, s in enumerate(slots):
            n = int(counts[i])
            if n > self.max_len:
                raise ValueError(f"context full: {n} tokens > {self.max_len}")
            self.data[:, :, s, :, :n] = new[:, :, i, :, :n]
            self.lengths[s] = n

    def write(self, new_kv: list[np.ndarray], counts: np.ndarray) -> None:
        """Append each slot's new entries (its first ``counts[s]`` of T) after its cached ones.

        new_kv: per layer keys then values, (S, heads, T, head_dim) each, as the decoder returns them.
        """
        rows = np.flatnonzero(counts)
        if new_kv[0].shape[2] == 1 and len(rows) > 4:  # a wide decode step: one indexed write for all
            n_layer, _, _, nh, _, hs = self.data.shape
            new = np.stack(new_kv).reshape(n_layer, 2, len(counts), nh, hs)  # (L, 2, k, nh, hs)
            # two index arrays apart: numpy puts their axis first, (rows, L, 2, nh, hs)
            self.data[:, :, rows, :, self.lengths[rows]] = new[:, :, rows].transpose(2, 0, 1, 3, 4)
        else:  # a prefill, or a few slots: plain slices, tensor by tensor, cost least
            for s in rows.tolist():
                start = int(self.lengths[s])
                stop = start + int(counts[s])
                for t, arr in enumerate(new_kv):
                    self.data[t >> 1, t & 1, s, :, start:stop] = arr[s, :, : stop - start]
        self.lengths[: len(counts)] += counts

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0


@dataclass
class StepBinding:
    """The decoder_step graph bound once to the first ``rows`` slots of a host cache: each layer's
    past and present to the same memory, and the ids, lengths and logits to arrays of their own
    that a step fills and reads. A step then costs one run and no binding."""

    io: Any  # onnxruntime.SessionIOBinding
    input_ids: np.ndarray  # (rows, 1) int64
    past_lengths: np.ndarray  # (rows,) int32
    logits: np.ndarray  # (rows, 1, V) float32
    values: list[Any]  # the OrtValues over those arrays and the cache, kept alive with the binding


class DeviceKVCache(KVCache):
    """The same cache in CUDA memory: two device buffers, read from one and appended into the other
    by the ``kv_write`` graph, then swapped. Keys and values never leave the device."""

    def __init__(self, info: ModelInfo, slots: int, device_id: int, max_len: int | None = None) -> None:
        self.slots = slots
        self.max_len = max_len or info.max_seq_len
        self.device_id = device_id
        self.shape = [info.n_layer, 2, slots, info.n_head, self.max_len, info.head_dim]
        self.buffers = [self._zeros(self.shape), self._zeros(self.shape)]
        self.lengths = np.zeros(slots, np.int64)

    def _zeros(self, shape: list[int]) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32), "cuda", self.device_id)

    @property
    def current(self) -> ort.OrtValue:
        return self.buffers[0]

    def swap(self) -> None:
        self.buffers.reverse()

    def layer_views(self, value: ort.OrtValue, shape: list[int]) -> list[tuple[str, int, list[int]]]:
        """(key or value, device pointer, shape) of each layer's slice of a (L, 2, S, nh, X, hs) buffer."""
        n_layer, _, slots, nh, x, hs = shape
        step = slots * nh * x * hs * 4  # bytes of one (S, nh, X, hs) float32 block
        base = value.data_ptr()
        return [
            (f"{kind}_{i}", base + (2 * i + j) * step, [slots, nh, x, hs])
            for i in range(n_layer)
            for j, kind in enumerate(("key", "value"))
        ]

    def feeds(self, k: int | None = None) -> dict[str, np.ndarray]:
        raise TypeError("a device cache is bound to the decoder, not fed from host memory")

    def write(self, new_kv: list[np.ndarray], counts: np.ndarray) -> None:
        raise TypeError("a device cache is appended to on the device, by Runtime.decode_step")


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Runtime:
    """The exported graphs of one model directory, on one execution provider."""

    def __init__(self, model_dir: Path | str, options: RuntimeOptions | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.options = options or RuntimeOptions()
        self.info = read_model_info(self.model_dir)
        self._verified: set[str] = set()
        if self.info.files is None:
            if self.options.require_digests:
                raise ModelDirError(
                    f"{self.model_dir / CONFIG}: records no file digests, and they are required "
                    "(require_model_digests): export the directory again"
                )
            log.info("%s records no file digests (exported before they were): files not checked", CONFIG)
        tok_path = self.model_dir / TOKENIZER
        if not tok_path.is_file():
            raise ModelDirError(f"{tok_path}: missing")
        self._verify(tok_path)
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:
            raise ModelDirError(f"{tok_path}: not a tokenizer file ({e})") from e
        # user text is text: "<|endoftext|>" typed in a prompt is thirteen characters, never the separator
        self.tokenizer.encode_special_tokens = True

        opts = self.options
        want_cuda = opts.device != "cpu" and cuda_usable(opts.device_id)
        if (opts.device == "cuda" or opts.require_cuda) and not want_cuda:
            if opts.require_cuda:
                raise CudaUnavailableError(f"CUDA required, but CUDA device {opts.device_id} is not usable here")
            log.warning("CUDA was requested but device %d is not usable here; running on CPU", opts.device_id)
        graphs = [*GRAPHS, *(g for g in OPTIONAL_GRAPHS if g in self.info.graphs)]
        self.sessions = {graph: self._session(graph, want_cuda) for graph in graphs}
        placed = {g: s.get_providers()[0] for g, s in self.sessions.items()}
        self.provider = CUDA if all(p == CUDA for p in placed.values()) else CPU
        if self.provider == CUDA:
            self.sessions[KV_WRITE] = self._session(KV_WRITE, want_cuda=True)
        elif want_cuda:  # some graphs landed on CPU: keep all of them there, together with the cache
            self.sessions = {graph: self._session(graph, want_cuda=False) for graph in graphs}
        if want_cuda and self.provider != CUDA:
            if opts.require_cuda:
                raise CudaUnavailableError(f"CUDA required, but the sessions were placed on {placed}")
            log.warning("CUDA sessions could not be created; running on CPU (%s)", placed)
        if self.provider == CPU and opts.fused_step:
            if STEP_GRAPH in self.info.graphs:
                self.sessions[STEP_GRAPH] = self._session(STEP_GRAPH, want_cuda=False)
            else:
                log.info(
                    "no %s graph in %s: decode steps run the decoder graph (export again for it)",
                    STEP_GRAPH,
                    self.model_dir,
                )
        log.info("model %s %s loaded from %s on %s", self.info.name, self.info.version, self.model_dir, self.provider)
        self.warmup_seconds = self.warmup() if self.options.warmup else 0.0

    @property
    def cpu_threads(self) -> int:
        """The intra-op threads a graph on the CPU runs on: as set, else one for each core this process
        may use (ONNX Runtime takes one per physical core; near enough for sizing batches)."""
        return self.options.intra_op_threads or usable_cores()

    @functools.cached_property
    def token_text(self) -> list[str]:
        """What each token reads as on its own, decoded once rather than per request or per token."""
        tok = self.tokenizer
        return [tok.decode([i], skip_special_tokens=False) for i in range(tok.get_vocab_size())]

    # --- loading ---------------------------------------------------------------------------

    def _graph_file(self, graph: str) -> Path:
        variant = self.options.variant
        key = variant_key(graph, variant)
        name = self.info.graphs.get(key) or self.info.graphs.get(graph)
        if name is None:
            raise ModelDirError(f"{self.model_dir / CONFIG}: no {graph!r} graph listed")
        if key not in self.info.graphs and variant != "fp32":
            log.info("no %s variant of the %s graph; using fp32", variant, graph)
        return self.model_dir / name

    def _verify(self, path: Path) -> None:
        """Check a file against the size and SHA-256 export recorded for it, where it recorded them:
        a copy cut short, a file changed since, bytes damaged on a disk or on their way, are refused
        by name before ONNX Runtime reads them (one that happens to parse would serve another model)."""
        files = self.info.files
        if files is None or path.name in self._verified:
            return
        if path.name not in files:
            raise ModelDirError(f"{path}: not among the files {CONFIG} records (export the directory again)")
        size, digest = files[path.name]
        if (actual := path.stat().st_size) != size:
            raise ModelDirError(f"{path}: {actual} bytes, where export wrote {size} (cut short or changed since)")
        if sha256(path) != digest:
            raise ModelDirError(f"{path}: not the bytes export wrote (its SHA-256 differs): damaged or changed since")
        self._verified.add(path.name)

    def _session(self, graph: str, want_cuda: bool) -> ort.InferenceSession:
        path = self._graph_file(graph)
        if not path.is_file():
            raise ModelDirError(f"{path}: missing")
        self._verify(path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.options.intra_op_threads
        if graph == STEP_GRAPH and self.options.step_threads:
            so.intra_op_num_threads = self.options.step_threads
        so.inter_op_num_threads = self.options.inter_op_threads
        so.log_severity_level = 3  # the provider fallback is reported once, by us, not per session
        if not self.options.spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers: list[Any] = [CPU]
        if want_cuda:
            cuda_opts: dict[str, Any] = {
                "arena_extend_strategy": "kSameAsRequested",
                # fp32 graphs in fp32: TF32 matmuls (the provider's default) moved the logits by ~1e-3 on an
                # H100 and greedy decoding off the CPU's tokens; the fp16 variant is the fast path
                "use_tf32": 0,
            }
            if self.options.device_id:  # 0 is the provider's default; naming it draws a warning from each
                cuda_opts["device_id"] = self.options.device_id  # session (no plugin EP device registered for it)
            if self.options.cuda_mem_limit_bytes:
                cuda_opts["gpu_mem_limit"] = self.options.cuda_mem_limit_bytes
            providers = [(CUDA, cuda_opts), CPU]
        try:
            return ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # ONNX Runtime raises its own types for corrupt and truncated files
            raise ModelDirError(f"{path}: ONNX Runtime cannot load it ({e})") from e

    def warmup(self) -> float:
        """Run every graph at a few shapes, so that allocation and kernel choice happen now."""
        t0 = time.perf_counter()
        longest = max(1, self.info.max_seq_len - 2)  # a prefill, then two one-token steps: room in any context
        shapes = sorted({(b, min(t, longest)) for b, t in ((1, 8), (4, 32), (8, 64))})
        for batch, seq in shapes:
            ids = np.zeros((batch, seq), np.int64)
            mask = np.ones((batch, seq), np.int64)
            self.encode(ids, mask)
            self.attention(ids, mask)
            cache = self.new_cache(batch)  # the cache the provider uses: on the device under CUDA
            self.decode_step(cache, ids, mask)
            self.decode_step(cache, ids[:, :1], mask[:, :1])
            if "decoder_attn" in self.sessions:
                self.decode_step_with_attention(cache, ids[:, :1], mask[:, :1])
        dt = time.perf_counter() - t0
        log.info("warm-up took %.2fs", dt)
        return dt

    # --- graphs ----------------------------------------------------------------------------

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncodeOutput:
        hidden, mean, last = self.sessions["encode"].run(
            None, {"input_ids": _i64(input_ids), "attention_mask": _i64(attention_mask)}
        )
        return EncodeOutput(hidden, mean, last)

    def attention(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Attention probabilities (B, layers, heads, T, T)."""
        (probs,) = self.sessions["attention"].run(
            None, {"input_ids": _i64(input_ids), "attention_mask": _i64(attention_mask)}
        )
        return probs

    def decode(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: list[tuple[np.ndarray, np.ndarray]] | None = None,
        graph: str = "decoder",
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call with an explicit cache (None: an empty one, as for a prefill): logits (B, T, V)
        and the graph's other outputs, the new keys/values flat per layer (then the attentions of decoder_attn)."""
        feeds = {"input_ids": _i64(input_ids), "attention_mask": _i64(attention_mask)}
        if past is None:
            empty = np.zeros((len(input_ids), self.info.n_head, 0, self.info.head_dim), np.float32)
            past = [(empty, empty)] * self.info.n_layer
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = k, v
        logits, *rest = self.sessions[graph].run(None, feeds)
        return logits, rest

    def decode_step(
        self, cache: KVCache, input_ids: np.ndarray, new_mask: np.ndarray, fused: bool = True
    ) -> np.ndarray:
        """Run T new tokens of every slot (right-padded, ``new_mask`` marks the real ones) against the cache,
        append their keys and values to it, and return the logits (S, T, V).

        One-token steps on a host cache run the decoder_step graph where it is loaded (``fused``
        False runs the decoder graph instead, as export's parity check does for both)."""
        if fused and input_ids.shape[1] == 1 and STEP_GRAPH in self.sessions and not isinstance(cache, DeviceKVCache):
            k = len(new_mask)
            lengths = cache.lengths[:k]
            # the fused graph writes a key and value in every row, even one sitting this step out:
            # a full slot has no room for that write, so such a step takes the decoder graph (which
            # checks for room); with every slot short of full, each has room for its one new token
            if k and max(lengths.tolist()) < cache.max_len:  # a list's max: cheaper than ndarray.max for a few rows
                b = self._step_binding(cache, k)
                b.input_ids[:] = input_ids
                b.past_lengths[:] = lengths
                self.sessions[STEP_GRAPH].run_with_iobinding(b.io)
                lengths += new_mask[:, 0]
                return b.logits.copy()  # the bound array is overwritten by the next step
        return self._step(cache, input_ids, new_mask, "decoder")[0]

    def _step_binding(self, cache: KVCache, rows: int) -> StepBinding:
        session = self.sessions[STEP_GRAPH]
        key = (id(session), rows)
        if key not in cache.bindings:
            io = session.io_binding()
            arrays: dict[str, np.ndarray] = {
                "input_ids": np.zeros((rows, 1), np.int64),
                "past_lengths": np.zeros(rows, np.int32),
                "logits": np.zeros((rows, 1, self.info.vocab_size), np.float32),
            }
            values: dict[str, Any] = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
            io.bind_ortvalue_input("input_ids", values["input_ids"])
            io.bind_ortvalue_input("past_lengths", values["past_lengths"])
            io.bind_ortvalue_output("logits", values["logits"])
            for name, view in cache.feeds(rows).items():  # past_{key,value}_{i}: contiguous views of the cache
                value = ort.OrtValue.ortvalue_from_numpy(view)  # on CPU this wraps the memory, no copy
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(name.replace("past_", "present_", 1), value)
                values[name] = value
            cache.bindings[key] = StepBinding(
                io, arrays["input_ids"], arrays["past_lengths"], arrays["logits"], list(values.values())
            )
        return cache.bindings[key]

    def decode_step_with_attention(
        self, cache: KVCache, input_ids: np.ndarray, new_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``decode_step`` through the decoder_attn graph: also what each new token attended to,
        (S, layers, heads, T, max_len + T): the cache's positions, then the new tokens."""
        logits, attentions = self._step(cache, input_ids, new_mask, "decoder_attn")
        assert attentions is not None
        return logits, attentions

    def _step(
        self, cache: KVCache, input_ids: np.ndarray, new_mask: np.ndarray, graph: str
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if graph not in self.sessions:
            raise ModelDirError(f"{self.model_dir / 'config.json'}: no {graph!r} graph (export it again)")
        counts = cache.check_room(new_mask)  # before running: positions past the context have no encoding
        if isinstance(cache, DeviceKVCache):
            if len(new_mask) != cache.slots:
                raise ValueError(f"a device cache steps all {cache.slots} slots together, not {len(new_mask)}")
            out = self._step_on_device(cache, input_ids, new_mask, graph)
            cache.lengths += counts
            return out
        k = len(new_mask)  # the first k slots take part; the rest are left alone
        feeds = {"input_ids": _i64(input_ids), "attention_mask": cache.attention_mask(new_mask)} | cache.feeds(k)
        logits, *rest = self.sessions[graph].run(None, feeds)
        n_kv = 2 * self.info.n_layer
        cache.write(rest[:n_kv], counts)
        return logits, (rest[n_kv] if len(rest) > n_kv else None)

    def prefill(
        self, cache: KVCache, slots: Sequence[int], prompts: Sequence[Sequence[int]], attention: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Run prompts into empty slots of the cache. Returns each prompt's last logits (len(prompts), V)
        and, with ``attention``, what each prompt's last token attended to: (layers, heads, len(prompt)) each.

        On the host cache only the new prompts are computed, in a batch of their own; on the
        device cache they are computed in place, with the other slots masked.
        """
        T = max(len(p) for p in prompts)
        if isinstance(cache, DeviceKVCache):
            ids = np.zeros((cache.slots, T), np.int64)
            mask = np.zeros((cache.slots, T), np.int64)
            for s, p in zip(slots, prompts, strict=True):
                ids[s, : len(p)], mask[s, : len(p)] = p, 1
            logits, att = self._step(cache, ids, mask, "decoder_attn" if attention else "decoder")
            M = cache.max_len
            rows = [
                (logits[s, len(p) - 1], None if att is None else att[s, :, :, len(p) - 1, M : M + len(p)])
                for s, p in zip(slots, prompts, strict=True)
            ]
        else:
            ids, mask = pad_right(prompts)
            logits, rest = self.decode(ids, mask, graph="decoder_attn" if attention else "decoder")
            n_kv = 2 * self.info.n_layer
            cache.fill(slots, rest[:n_kv], mask.sum(1))
            att = rest[n_kv] if attention else None
            rows = [
                (logits[i, len(p) - 1], None if att is None else att[i, :, :, len(p) - 1, : len(p)])
                for i, p in enumerate(prompts)
            ]
        last = np.stack([r[0] for r in rows])
        return last, ([r[1] for r in rows] if attention else None)  # type: ignore[misc]

    def _step_on_device(
        self, cache: DeviceKVCache, input_ids: np.ndarray, new_mask: np.ndarray, graph: str
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Decoder with the cache bound in place on the device; new keys/values land in a device buffer
        that ``kv_write`` appends to the cache. Only ids and mask go up, and only logits (and attention,
        when asked) come down."""
        dev = self.options.device_id
        io = self.sessions[graph].io_binding()
        io.bind_cpu_input("input_ids", _i64(input_ids))
        io.bind_cpu_input("attention_mask", cache.attention_mask(new_mask))
        for name, ptr, shape in cache.layer_views(cache.current, cache.shape):
            io.bind_input(f"past_{name}", "cuda", dev, np.float32, shape, ptr)
        # get_outputs() lists the outputs in the order they were bound: the host ones first
        io.bind_output("logits", "cpu")
        if graph == "decoder_attn":
            io.bind_output("attentions", "cpu")
        new_shape = [*cache.shape[:4], input_ids.shape[1], cache.shape[5]]
        new = ort.OrtValue.ortvalue_from_shape_and_type(new_shape, np.float32, "cuda", dev)
        for name, ptr, shape in cache.layer_views(new, new_shape):
            io.bind_output(f"new_{name}", "cuda", dev, np.float32, shape, ptr)
        self.sessions[graph].run_with_iobinding(io)
        outputs = io.get_outputs()
        logits = outputs[0].numpy()
        attentions = outputs[1].numpy() if graph == "decoder_attn" else None

        write = self.sessions["kv_write"].io_binding()
        write.bind_ortvalue_input("cache", cache.current)
        write.bind_ortvalue_input("new", new)
        write.bind_cpu_input("start", cache.lengths.copy())
        write.bind_ortvalue_output("updated", cache.buffers[1])
        self.sessions["kv_write"].run_with_iobinding(write)
        cache.swap()
        return logits, attentions

    def new_cache(self, slots: int) -> KVCache:
        if self.provider == CUDA:
            return DeviceKVCache(self.info, slots, self.options.device_id)
        return KVCache(self.info, slots)


def pad_right(seqs: Sequence[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) ids and mask from token sequences of different lengths, padded at the end."""
    T = max(len(x) for x in seqs)
    ids = np.zeros((len(seqs), T), np.int64)
    mask = np.zeros((len(seqs), T), np.int64)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return ids, mask


def _i64(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == np.int64 else a.astype(np.int64)
