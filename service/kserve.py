"""The Open Inference Protocol (KServe v2) on the same server: one service, two protocols.

Three models, each a view of the native API:

* ``attnserve-encode``: TEXT BYTES [-1] -> EMBEDDING FP32 [-1, d], TOKEN_COUNT INT32 [-1];
  parameters pooling ("mean", "last"), normalize (bool), truncation ("error", "end", "start").
* ``attnserve-generate``: TEXT BYTES [1] -> TEXT BYTES [1]; the sampling parameters as request
  parameters. Decoupled on ModelStreamInfer: one response per token group, the last marked by
  ``triton_final_response`` and carrying finish_reason and the token counts.
* ``attnserve-attention``: TEXT BYTES [1] -> ATTENTION FP32 [L, H, T, T], TOKENS BYTES [T];
  parameter truncation.

A request here becomes the native request and runs through the very code that serves the native
RPC (``AttnServeServicer.encode`` and the rest): the same limits, batchers, scheduler, metrics
(``rpc`` = ModelInfer or ModelStreamInfer) and status codes. This module only translates tensors.

Tensors come as typed ``contents`` or as ``raw_input_contents`` (BYTES elements each a 4-byte
little-endian length and the bytes), and the answer comes the same way as the request did.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.inference import grpc_predict_v2_pb2 as v2
from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service.errors import SHUTTING_DOWN, STREAM_NOT_READ, InvalidInput, ModelNotReady, NotFound, details
from service.guard import STREAM_IDLE
from service.scheduler import Done, Token
from service.servicer import AttnServeServicer, package_version

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ENCODE, GENERATE, ATTENTION = "attnserve-encode", "attnserve-generate", "attnserve-attention"
MODELS = (ENCODE, GENERATE, ATTENTION)

# Parameters clients set for the server or the transport, not for the model: accepted and ignored,
# but for "timeout" (microseconds, as tritonclient's infer(timeout=...) sends it), which bounds the
# request's time as a deadline does (request_deadline), and "priority" (tritonclient's
# infer(priority=...): 1 high, 2 normal, 3 low, 0 the default), which is the native calls' Priority.
RESERVED_PARAMETERS = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "headers")

# parameter name -> the kind of value it takes, per model
PARAMETERS: dict[str, dict[str, str]] = {
    ENCODE: {"pooling": "str", "normalize": "bool", "truncation": "str"},
    GENERATE: {
        "max_new_tokens": "int",
        "temperature": "float",
        "top_k": "int",
        "top_p": "float",
        "repetition_penalty": "float",
        "seed": "int",
        "stop": "str",
        "truncation": "str",
    },
    ATTENTION: {"truncation": "str"},
}
# the InferParameter fields that may hold a value of each kind, and how the kind is named to a client
KIND_FIELDS = {
    "bool": ("bool_param",),
    "str": ("string_param",),
    "int": ("int64_param", "uint64_param"),
    "float": ("double_param", "int64_param", "uint64_param"),
}
KIND_NAMES = {"bool": "a bool", "str": "a string", "int": "an integer", "float": "a number"}

# "error" (the default, as natively): input over the context is refused; "end": it is cut at the end;
# "start": at the start (a prompt's, so that max_new_tokens fit after it)
TRUNCATION: dict[str, Any] = {
    "error": pb.TRUNCATION_ERROR,
    "none": pb.TRUNCATION_ERROR,
    "end": pb.TRUNCATION_END,
    "start": pb.TRUNCATION_START,
}


# the InferParameter field that holds a value of each Python type, in responses
PARAMETER_FIELD = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]


def signature(model: str, d_model: int, n_layer: int, n_head: int) -> tuple[list[Tensor], list[Tensor]]:
    """A model's inputs and outputs as ModelMetadata tells them."""
    if model == ENCODE:
        return [Tensor("TEXT", "BYTES", (-1,))], [
            Tensor("EMBEDDING", "FP32", (-1, d_model)),
            Tensor("TOKEN_COUNT", "INT32", (-1,)),
        ]
    if model == GENERATE:
        return [Tensor("TEXT", "BYTES", (1,))], [Tensor("TEXT", "BYTES", (1,))]
    return [Tensor("TEXT", "BYTES", (1,))], [
        Tensor("ATTENTION", "FP32", (n_layer, n_head, -1, -1)),
        Tensor("TOKENS", "BYTES", (-1,)),
    ]


# --- tensors in and out ------------------------------------------------------------------------


def split_bytes(raw: bytes, field: str) -> list[bytes]:
    """BYTES elements from their serialized form: each a 4-byte little-endian length, then the bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidInput(f"{field}: {len(raw) - at} bytes left where a 4-byte element length was expected")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise InvalidInput(f"{field}: an element of {n} bytes runs past the end ({len(raw) - at} left)")
        out.append(raw[at : at + n])
        at += n
    return out


def join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def read_texts(request: v2.ModelInferRequest, model: str, one: bool) -> list[str]:
    """The TEXT input's strings, checked against the model's signature; InvalidInput naming the field."""
    names = [t.name for t in request.inputs]
    for i, name in enumerate(names):
        if name != "TEXT":
            raise InvalidInput(f"inputs[{i}].name: {model} has no input {name!r}; it takes TEXT")
    if not names:
        raise InvalidInput(f"inputs: the input TEXT is missing ({model} takes TEXT BYTES)")
    if len(names) > 1:
        raise InvalidInput("inputs: TEXT is given more than once")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"inputs[0].datatype: TEXT is BYTES, not {tensor.datatype!r}")
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or min(shape) < 0 or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"inputs[0].shape: {shape}; TEXT is [n] (or [n, 1]) strings")
    count = shape[0]
    if one and count != 1:
        raise InvalidInput(f"inputs[0].shape: {shape}; {model} takes one text, shape [1]")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(f"raw_input_contents: {len(request.raw_input_contents)} entries for 1 input")
        if tensor.HasField("contents"):
            raise InvalidInput("inputs[0].contents: give the contents or raw_input_contents, not both")
        elements = split_bytes(request.raw_input_contents[0], "raw_input_contents[0]")
    else:
        elements = list(tensor.contents.bytes_contents)
    if len(elements) != count:
        raise InvalidInput(f"inputs[0]: shape {shape} holds {count} elements, but {len(elements)} were given")
    texts = []
    for j, element in enumerate(elements):
        try:
            texts.append(element.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"inputs[0] element {j}: not valid UTF-8") from None
    return texts


def request_deadline(request: v2.ModelInferRequest, deadline: float | None, start: float) -> float | None:
    """The request's deadline: the call's, or sooner where the request carries Triton's ``timeout``
    parameter, microseconds from ``start`` (0: none, as Triton has it)."""
    if "timeout" not in request.parameters:
        return deadline
    param = request.parameters["timeout"]
    which = param.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param") or param.int64_param < 0:
        raise InvalidInput("parameters.timeout: microseconds, an integer >= 0, is expected")
    micros = getattr(param, which)
    if micros == 0:
        return deadline
    ends = start + micros / 1e6
    return ends if deadline is None else min(deadline, ends)


def request_priority(request: v2.ModelInferRequest) -> int:
    """The request's Triton ``priority`` parameter, as attnserve.v1's Priority (the same numbers: 1
    the highest; 0, or none, the default)."""
    if "priority" not in request.parameters:
        return pb.PRIORITY_UNSPECIFIED
    param = request.parameters["priority"]
    which = param.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param") or not 0 <= getattr(param, which) <= pb.PRIORITY_LOW:
        raise InvalidInput(
            "parameters.priority: an integer, 1 (high), 2 (normal) or 3 (low), or 0 for the default, is expected"
        )
    return int(getattr(param, which))


def read_parameters(request: v2.ModelInferRequest, model: str) -> dict[str, Any]:
    """The request's parameters, by the kind each takes; unknown ones are refused by name."""
    kinds = PARAMETERS[model]
    out: dict[str, Any] = {}
    for key, param in request.parameters.items():
        if key.startswith("triton_") or key in RESERVED_PARAMETERS:
            continue
        kind = kinds.get(key)
        if kind is None:
            raise InvalidInput(f"parameters.{key}: {model} has no such parameter; it takes {', '.join(kinds)}")
        which = param.WhichOneof("parameter_choice")
        value = getattr(param, which) if which else None
        if which not in KIND_FIELDS[kind]:
            raise InvalidInput(f"parameters.{key}: {KIND_NAMES[kind]} is expected, not {which or 'nothing'}")
        out[key] = value
    return out


def choice(params: dict[str, Any], key: str, options: dict[str, Any], default: Any) -> Any:
    if key not in params:
        return default
    value = str(params[key]).lower()
    if value not in options:
        raise InvalidInput(f"parameters.{key}: {params[key]!r} is not one of {', '.join(options)}")
    return options[value]


class Outputs:
    """The response's output tensors, in the order and the form (raw or typed) the request asked for."""

    def __init__(self, request: v2.ModelInferRequest, model: str, available: list[Tensor]) -> None:
        names = [t.name for t in available]
        wanted = [o.name for o in request.outputs]
        for i, name in enumerate(wanted):
            if name not in names:
                raise InvalidInput(f"outputs[{i}].name: {model} has no output {name!r}; it gives {', '.join(names)}")
        self.wanted = wanted or names
        self.raw = not any(t.HasField("contents") for t in request.inputs)
        self.types = {t.name: t.datatype for t in available}

    def fill(self, response: v2.ModelInferResponse, values: dict[str, Any]) -> v2.ModelInferResponse:
        for name in self.wanted:
            value = values[name]
            datatype = self.types[name]
            tensor = response.outputs.add(name=name, datatype=datatype)
            if datatype == "BYTES":
                elements = [v.encode("utf-8") if isinstance(v, str) else v for v in value]
                tensor.shape.append(len(elements))
                if self.raw:
                    response.raw_output_contents.append(join_bytes(elements))
                else:
                    tensor.contents.bytes_contents.extend(elements)
                continue
            array = np.ascontiguousarray(value, dtype="<f4" if datatype == "FP32" else "<i4")
            tensor.shape.extend(array.shape)
            if self.raw:
                response.raw_output_contents.append(array.tobytes())
            elif datatype == "FP32":
                tensor.contents.fp32_contents.extend(array.ravel().tolist())
            else:
                tensor.contents.int_contents.extend(array.ravel().tolist())
        return response


# --- the service ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Finished:
    """Put on a stream's queue when one of its requests has had its last response, with what gives
    back what the request held (its attention map's bytes) once those responses have gone out."""

    releases: list[Callable[[], None]]

    def release(self) -> None:
        for give_back in self.releases:
            give_back()


# A stream's requests taken and not yet answered in full. Beyond it the stream reads no more requests
# until one's responses have gone out, and HTTP/2's flow control holds the client back: a client that
# sent requests and read no responses had the server serve them all and keep every answer, 4,456
# embeddings in 3 s and without end. Twice the default batch: a client pipelining on one stream still
# fills batches.
STREAM_REQUESTS_IN_PROGRESS = 64


class InferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, native: AttnServeServicer, ready: Callable[[], bool]) -> None:
        self.native = native
        self.ready = ready  # whether the server takes inference requests (False while loading or stopping)
        self.closing = asyncio.Event()  # set when the server stops taking calls: open streams end

    # health and metadata

    async def ServerLive(self, request: v2.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return v2.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request: v2.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def handle() -> v2.ModelReadyResponse:
            if request.name not in MODELS or self.native.engine is not None:
                self._model(request.name, request.version)  # NOT_FOUND for what is not here
            return v2.ModelReadyResponse(ready=self.ready())

        return await self.native._call("ModelReady", context, handle)

    async def ServerMetadata(self, request: v2.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        return v2.ServerMetadataResponse(name="attnserve", version=package_version(), extensions=[])

    async def ModelMetadata(self, request: v2.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        async def handle() -> v2.ModelMetadataResponse:
            model, version = self._model(request.name, request.version)
            inputs, outputs = self._signature(model)
            meta = v2.ModelMetadataResponse.TensorMetadata
            return v2.ModelMetadataResponse(
                name=model,
                versions=[version],
                platform="onnxruntime_onnx",
                inputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in inputs],
                outputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in outputs],
            )

        return await self.native._call("ModelMetadata", context, handle)

    def _model(self, name: str, version: str) -> tuple[str, str]:
        if name not in MODELS:
            raise NotFound(f"model_name: no model {name!r} here; the models are {', '.join(MODELS)}")
        model_version = self.native._engine().runtime.info.version
        if version and version != model_version:
            raise NotFound(f"model_version: {name} has version {model_version!r}, not {version!r}")
        return name, model_version

    def _signature(self, model: str) -> tuple[list[Tensor], list[Tensor]]:
        info = self.native._engine().runtime.info
        return signature(model, info.d_model, info.n_layer, info.n_head)

    # inference

    async def ModelInfer(self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        def hold(release: Callable[[], None]) -> None:  # until the answer is sent, or the call gone
            context.add_done_callback(lambda _: release())

        async def handle() -> v2.ModelInferResponse:
            deadline = request_deadline(request, self.native._deadline(context), time.monotonic())
            responses = [r async for r in self._infer(request, deadline, stream=False, hold=hold)]
            return responses[-1]

        return await self.native._call("ModelInfer", context, handle)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[v2.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Each request served as it arrives, its responses written as they come; a request that fails
        gets a response with error_message and the stream goes on. At most
        STREAM_REQUESTS_IN_PROGRESS requests are served at once; the next is read once one is
        answered. When the server stops taking calls, the requests in progress finish and the stream
        ends with UNAVAILABLE. A stream whose client takes none of its responses for the native
        servicer's WriteWatch bound is ended DEADLINE_EXCEEDED (STREAM_NOT_READ), as a generation
        stream is."""
        opened = time.monotonic()
        deadline = self.native._deadline(context)
        queue: asyncio.Queue[v2.ModelStreamInferResponse | _Finished | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        ended = False  # the stream: what its requests hold is given back at once, not through the queue

        async def serve_one(request: v2.ModelInferRequest) -> None:
            start = time.monotonic()
            code, message, reason = grpc.StatusCode.OK, "", ""
            held: list[Callable[[], None]] = []
            try:
                if self.closing.is_set():
                    raise ModelNotReady("server is shutting down; retry on another replica", SHUTTING_DOWN)
                own = request_deadline(request, deadline, start)
                async for response in self._infer(request, own, stream=True, hold=held.append):
                    await queue.put(v2.ModelStreamInferResponse(infer_response=response))
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as e:
                code, message, reason, _ = self.native.failure("ModelStreamInfer", e, context)
                error = v2.ModelInferResponse(model_name=request.model_name, id=request.id)
                await queue.put(v2.ModelStreamInferResponse(error_message=message, infer_response=error))
            finally:
                self.native._unpin()
                self.native._observe("ModelStreamInfer", code, start, context, message, reason)
                finished = _Finished(held)
                if ended:
                    finished.release()
                else:
                    queue.put_nowait(finished)

        counts = {"started": 0, "finished": 0}
        room = asyncio.Semaphore(STREAM_REQUESTS_IN_PROGRESS)  # taken for a request, given back once it is answered
        idle = STREAM_IDLE.get()  # told when the stream has no request in progress, for the guard

        async def read() -> None:
            pending = aiter(requests)
            while True:
                await room.acquire()
                idle(counts["started"] == counts["finished"])
                try:
                    request = await anext(pending)
                except StopAsyncIteration:
                    break
                finally:
                    idle(False)
                counts["started"] += 1
                task = asyncio.create_task(serve_one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await queue.put(None)  # the client half-closed: end once every request has finished

        reader = asyncio.create_task(read())
        closing = asyncio.create_task(self.closing.wait())
        stopping = half_closed = False
        get: asyncio.Future[Any] | None = None
        write = context.write  # (written rather than yielded: a write the watch ends can still be answered)
        watch = self.native.write_watch
        writing = None if watch is None else watch.join()
        try:
            while True:
                if (half_closed or stopping) and counts["finished"] == counts["started"] and queue.empty():
                    if stopping:
                        code, message = grpc.StatusCode.UNAVAILABLE, "server is shutting down; reconnect"
                        await context.abort(code, message, details(code, message, SHUTTING_DOWN))
                    return
                get = asyncio.ensure_future(queue.get())
                waits: set[asyncio.Future[Any]] = {get}
                if not stopping:
                    waits.add(closing)
                if not reader.done():
                    waits.add(reader)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if closing.done() and not stopping:
                    stopping = True  # take no more requests; finish those in progress
                    reader.cancel()
                if reader.done() and not reader.cancelled() and (broken := reader.exception()) is not None:
                    raise broken  # the request stream failed (a malformed message, the client gone)
                if not get.done():
                    get.cancel()
                    continue
                item = get.result()
                if item is None:
                    half_closed = True
                elif isinstance(item, _Finished):
                    counts["finished"] += 1
                    item.release()  # its responses have gone out
                    room.release()
                    if counts["finished"] == counts["started"] and not (half_closed or stopping):
                        idle(True)  # its reader waits for the next request
                else:
                    if writing is not None:
                        writing.since = time.monotonic()
                    try:
                        await write(item)
                    except Exception:  # gRPC could not send it: the call has ended on the wire, its client gone
                        return
                    if writing is not None:
                        writing.since = 0.0
        except asyncio.CancelledError:
            if watch is None or (said := watch.answer(writing, context)) is None:
                raise  # the client went away, or its deadline passed
            code = grpc.StatusCode.DEADLINE_EXCEEDED  # ended by the watch, and answered
            self.native._observe("ModelStreamInfer", code, opened, context, said, STREAM_NOT_READ)
        finally:
            if writing is not None:
                watch.streams.discard(writing)  # type: ignore[union-attr]
            ended = True
            reader.cancel()
            closing.cancel()
            if get is not None:  # ended (a request that did not parse, the client gone) while waiting on the queue
                if get.done() and not get.cancelled() and isinstance(item := get.result(), _Finished):
                    item.release()
                get.cancel()
            for task in list(tasks):
                task.cancel()  # each gives back what it holds as it ends (ended is set)
            while not queue.empty():  # what finished and was never sent
                if isinstance(item := queue.get_nowait(), _Finished):
                    item.release()

    async def _infer(
        self,
        request: v2.ModelInferRequest,
        deadline: float | None,
        stream: bool,
        hold: Callable[[Callable[[], None]], None],
    ) -> AsyncIterator[v2.ModelInferResponse]:
        """The request's responses; ``hold`` is given what gives back what the request holds (an
        attention map's bytes), for the caller to call once the responses are sent."""
        model, version = self._model(request.model_name, request.model_version)
        _, available = self._signature(model)
        outputs = Outputs(request, model, available)
        params = read_parameters(request, model)
        priority = request_priority(request)

        def response(**parameters: Any) -> v2.ModelInferResponse:
            r = v2.ModelInferResponse(model_name=model, model_version=version, id=request.id)
            for key, value in parameters.items():
                setattr(r.parameters[key], PARAMETER_FIELD[type(value)], value)
            return r

        if model == ENCODE:
            native = pb.EncodeRequest(
                texts=read_texts(request, model, one=False),
                pooling=choice(params, "pooling", {"mean": pb.POOLING_MEAN, "last": pb.POOLING_LAST}, pb.POOLING_MEAN),
                normalize=bool(params.get("normalize", False)),
                truncation=choice(params, "truncation", TRUNCATION, pb.TRUNCATION_ERROR),
                priority=priority,  # type: ignore[arg-type]
            )
            done = await self.native.encode(native, deadline)
            values = {"EMBEDDING": done.output.vectors, "TOKEN_COUNT": done.output.token_counts}
            yield outputs.fill(response(), values)
            return
        if model == ATTENTION:
            (text,) = read_texts(request, model, one=True)
            truncation = choice(params, "truncation", TRUNCATION, pb.TRUNCATION_ERROR)
            native_att = pb.AttentionMapRequest(text=text, truncation=truncation, priority=priority)  # type: ignore[arg-type]
            att = await self.native.attention_map(native_att, deadline)
            hold(att.release)
            tokens = self.native._engine().token_strings(att.ids)
            yield outputs.fill(response(truncated=att.truncated), {"ATTENTION": att.output.probs, "TOKENS": tokens})
            return
        (prompt,) = read_texts(request, model, one=True)
        native_gen = generate_request(prompt, params)
        native_gen.priority = priority  # type: ignore[assignment]
        ids, sampling, truncated, level = await self.native._generation(native_gen, deadline)
        # as Triton's decoupled models: the last response is marked final, or, when the client asks
        # for it, an empty response after the last one is
        empty_final = stream and request.parameters["triton_enable_empty_final_response"].bool_param
        final = {"triton_final_response": not empty_final} if stream else {}
        async for group in self.native._scheduler().generate(ids, sampling, deadline, stream=stream, priority=level):
            end = next((e for e in group if isinstance(e, Done)), None)
            piece = "".join(e.text for e in group if isinstance(e, Token))
            if end is None:
                yield outputs.fill(response(triton_final_response=False), {"TEXT": [piece]})
                continue
            usage = {
                "finish_reason": end.finish.value,
                "prompt_tokens": end.prompt_tokens,
                "generated_tokens": end.generated_tokens,
                "prompt_truncated": truncated,
            }
            whole = end.text if not stream else piece
            yield outputs.fill(response(**usage, **final), {"TEXT": [whole]})
            if empty_final:
                yield response(triton_final_response=True)
            return


def generate_request(prompt: str, params: dict[str, Any]) -> pb.GenerateRequest:
    """The native request for a v2 generate call. ``stop`` is one stop sequence, or a JSON list of them."""
    request = pb.GenerateRequest(prompt=prompt, max_new_tokens=int(params.get("max_new_tokens", 64)))
    for key in ("temperature", "top_p", "repetition_penalty"):
        if key in params:
            setattr(request, key, float(params[key]))
    if "top_k" in params:
        if params["top_k"] < 0:
            raise InvalidInput(f"parameters.top_k: {params['top_k']} must not be negative")
        request.top_k = int(params["top_k"])
    if "seed" in params:
        request.seed = int(params["seed"])
    if "truncation" in params:
        request.truncation = choice(params, "truncation", TRUNCATION, pb.TRUNCATION_ERROR)
    if "stop" in params:
        stop = params["stop"]
        try:
            parsed = json.loads(stop) if stop.startswith("[") else [stop]
        except json.JSONDecodeError:
            parsed = [stop]
        if not isinstance(parsed, list) or not all(isinstance(s, str) for s in parsed):
            raise InvalidInput("parameters.stop: a stop sequence, or a JSON list of strings")
        request.stop.extend(parsed)
    return request
