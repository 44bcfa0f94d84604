"""Calls attnserve's Open Inference Protocol endpoint with tritonclient, as a Triton user would.

Run by tests/service/test_tritonclient.py in a virtual environment of its own (tritonclient
pins a protobuf older than the server's). Prints one JSON object of what each call returned.
Usage: python tritonclient_calls.py HOST:PORT PROMPT SEED TEXT...
       python tritonclient_calls.py --keyed HOST:PORT API_KEY
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

SAMPLING = {"max_new_tokens": 12, "temperature": 0.8, "top_k": 20}


def text_input(texts: list[str]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("TEXT", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return tensor


def array(x: np.ndarray) -> dict[str, Any]:
    x = np.ascontiguousarray(x, dtype="<f4")
    return {"shape": list(x.shape), "b64": base64.b64encode(x.tobytes()).decode()}


def sync_calls(address: str, prompt: str, seed: int, texts: list[str]) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(address)
    out: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "models_ready": {m: client.is_model_ready(m) for m in ("attnserve-encode", "attnserve-generate")},
        "metadata": {
            m: client.get_model_metadata(m, as_json=True)
            for m in ("attnserve-encode", "attnserve-generate", "attnserve-attention")
        },
        "server": client.get_server_metadata(as_json=True),
    }
    encoded = client.infer("attnserve-encode", [text_input(texts)], parameters={"pooling": "last", "normalize": True})
    out["embedding"] = array(encoded.as_numpy("EMBEDDING"))
    out["token_count"] = encoded.as_numpy("TOKEN_COUNT").tolist()
    attended = client.infer("attnserve-attention", [text_input(texts[:1])])
    out["attention"] = array(attended.as_numpy("ATTENTION"))
    out["tokens"] = [t.decode() for t in attended.as_numpy("TOKENS")]
    generated = client.infer("attnserve-generate", [text_input([prompt])], parameters={**SAMPLING, "seed": seed})
    out["generated"] = generated.as_numpy("TEXT")[0].decode()
    out["finish_reason"] = generated.get_response().parameters["finish_reason"].string_param

    # the decoupled stream, as Triton's streaming clients use it: a callback per response
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(
        "attnserve-generate",
        [text_input([prompt])],
        request_id="s1",
        parameters={**SAMPLING, "seed": seed},
        enable_empty_final_response=True,
    )
    pieces, messages = [], 0
    while True:
        result, error = responses.get(timeout=30)
        if error is not None:
            raise error
        response = result.get_response()
        messages += 1
        if response.outputs:
            pieces.append(result.as_numpy("TEXT")[0].decode())
        if response.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    out["streamed"] = {"text": "".join(pieces), "messages": messages, "id": response.id}
    try:
        client.infer("no-such-model", [text_input(["x"])])
        out["unknown_model"] = "no error"
    except Exception as e:  # InferenceServerException
        out["unknown_model"] = [str(getattr(e, "status", lambda: "")()), str(getattr(e, "message", lambda: "")())]
    # Triton's request timeout, in microseconds: one over before the model is asked, one with time to spare
    try:
        client.infer("attnserve-encode", [text_input(texts[:1])], timeout=1)
        out["timed_out"] = "no error"
    except Exception as e:  # InferenceServerException
        out["timed_out"] = str(getattr(e, "status", lambda: "")())
    out["in_time"] = (
        client.infer("attnserve-encode", [text_input(texts[:1])], timeout=30_000_000).as_numpy("TOKEN_COUNT").tolist()
    )
    client.close()
    return out


async def aio_calls(address: str, prompt: str, seed: int, texts: list[str]) -> dict[str, Any]:
    client = aioclient.InferenceServerClient(address)
    out: dict[str, Any] = {
        "live": await client.is_server_live(),
        "ready": await client.is_model_ready("attnserve-encode"),
    }
    encoded = await client.infer("attnserve-encode", [text_input(texts)], parameters={"pooling": "mean"})
    out["embedding"] = array(encoded.as_numpy("EMBEDDING"))

    async def requests():  # type: ignore[no-untyped-def]
        yield {
            "model_name": "attnserve-generate",
            "inputs": [text_input([prompt])],
            "parameters": {**SAMPLING, "seed": seed},
        }

    pieces = []
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise error
        pieces.append(result.as_numpy("TEXT")[0].decode())
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    out["streamed"] = "".join(pieces)
    await client.close()
    return out


def keyed_calls(address: str, key: str) -> dict[str, Any]:
    """Against a server that asks for API keys: probes with none, inference without one and with one
    (``headers``, as tritonclient sends them), unary, streamed and on asyncio."""

    def status(call: Any) -> str:
        try:
            call()
            return "OK"
        except Exception as e:  # InferenceServerException
            return str(getattr(e, "status", lambda: "")())

    headers = {"authorization": f"Bearer {key}"}
    client = grpcclient.InferenceServerClient(address)
    out: dict[str, Any] = {"live": client.is_server_live(), "ready": client.is_model_ready("attnserve-encode")}
    out["without"] = status(lambda: client.infer("attnserve-encode", [text_input(["the king"])]))
    encoded = client.infer("attnserve-encode", [text_input(["the king"])], headers=headers)
    out["with"] = list(encoded.as_numpy("EMBEDDING").shape)
    for name, sent in (("stream_without", None), ("stream_with", headers)):
        responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error, q=responses: q.put((result, error)), headers=sent)
        # refused as it opens, the stream may be over before the request is sent: the error is the callback's
        with contextlib.suppress(Exception):
            client.async_stream_infer("attnserve-generate", [text_input(["My lord"])], parameters={"max_new_tokens": 2})
        result, error = responses.get(timeout=30)
        out[name] = str(error.status()) if error is not None else result.as_numpy("TEXT").dtype.kind
        client.stop_stream()
    client.close()

    async def aio() -> None:
        aclient = aioclient.InferenceServerClient(address)
        try:
            await aclient.infer("attnserve-encode", [text_input(["a"])])
            out["aio_without"] = "OK"
        except Exception as e:
            out["aio_without"] = str(getattr(e, "status", lambda: "")())
        encoded = await aclient.infer("attnserve-encode", [text_input(["a"])], headers=headers)
        out["aio_with"] = list(encoded.as_numpy("EMBEDDING").shape)
        await aclient.close()

    asyncio.run(aio())
    return out


def main() -> None:
    if sys.argv[1] == "--keyed":
        print(json.dumps(keyed_calls(sys.argv[2], sys.argv[3])))
        return
    address, prompt, seed, *texts = sys.argv[1:]
    result = {
        "sync": sync_calls(address, prompt, int(seed), texts),
        "aio": asyncio.run(aio_calls(address, prompt, int(seed), texts)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
