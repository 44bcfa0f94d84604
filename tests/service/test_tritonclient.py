"""tritonclient, from PyPI, calls the Open Inference Protocol endpoint and gets the native RPCs' numbers.

The client runs in a virtual environment of its own (``.venv/tritonclient``, made once), since it
pins a protobuf older than the server's; tritonclient_calls.py makes the calls, sync and asyncio,
and prints what came back.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protos.attnserve.v1 import attnserve_pb2 as pb
from service.client import decode_probabilities
from tests.service.conftest import ServerThread, config
from tests.venvs import venv_with

ROOT = Path(__file__).resolve().parents[2]
TRITONCLIENT = "tritonclient[grpc]==2.73.0"
TEXTS = ["To be, or not to be", "the king speaks of the crown", "a"]
SAMPLING = {"max_new_tokens": 12, "temperature": 0.8, "top_k": 20}  # as tritonclient_calls.py sends


def array(x: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(x["b64"]), dtype="<f4").reshape(x["shape"])


@pytest.fixture(scope="module")
def triton_python() -> Path:
    return venv_with(ROOT / ".venv" / "tritonclient", [TRITONCLIENT])


@pytest.mark.network
def test_tritonclient_gets_the_native_numbers(served: ServerThread, triton_python: Path) -> None:
    script = Path(__file__).with_name("tritonclient_calls.py")
    ran = subprocess.run(
        [str(triton_python), str(script), served.address, "ROMEO:", "11", *TEXTS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = json.loads(ran.stdout)
    sync, aio = got["sync"], got["aio"]
    stub = served.stub()
    info = stub.GetModelInfo(pb.GetModelInfoRequest())

    assert sync["live"] and sync["ready"] and all(sync["models_ready"].values())
    assert aio["live"] and aio["ready"]
    assert sync["server"]["name"] == "attnserve"
    encode_meta = sync["metadata"]["attnserve-encode"]
    assert encode_meta["versions"] == [info.version]
    assert encode_meta["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1"]}]
    assert encode_meta["outputs"][0] == {
        "name": "EMBEDDING",
        "datatype": "FP32",
        "shape": ["-1", str(info.hidden_size)],
    }

    last = stub.Encode(pb.EncodeRequest(texts=TEXTS, pooling=pb.POOLING_LAST, normalize=True))
    np.testing.assert_allclose(array(sync["embedding"]), [e.values for e in last.embeddings], atol=1e-5)
    assert sync["token_count"] == [e.token_count for e in last.embeddings]
    mean = stub.Encode(pb.EncodeRequest(texts=TEXTS))
    np.testing.assert_allclose(array(aio["embedding"]), [e.values for e in mean.embeddings], atol=1e-5)

    attention = stub.AttentionMap(pb.AttentionMapRequest(text=TEXTS[0]))
    np.testing.assert_array_equal(array(sync["attention"]), decode_probabilities(attention))
    assert sync["tokens"] == list(attention.tokens)

    generated = stub.Generate(pb.GenerateRequest(prompt="ROMEO:", seed=11, **SAMPLING))
    assert sync["generated"] == generated.text
    assert sync["finish_reason"] == "length"
    assert sync["timed_out"] == "StatusCode.DEADLINE_EXCEEDED" and sync["in_time"] == sync["token_count"][:1]
    assert sync["streamed"]["text"] == generated.text and sync["streamed"]["id"] == "s1"
    assert sync["streamed"]["messages"] >= 2  # token groups, then the empty final response asked for
    assert aio["streamed"] == generated.text

    status, message = sync["unknown_model"]
    assert "NOT_FOUND" in status and "no-such-model" in message


@pytest.mark.network
def test_tritonclient_sends_an_api_key_as_a_header(model_dir: Path, tmp_path: Path, triton_python: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("triton-user key-for-triton\n")
    st = ServerThread(config(model_dir, api_keys_file=keys)).start()
    try:
        script = Path(__file__).with_name("tritonclient_calls.py")
        ran = subprocess.run(
            [str(triton_python), str(script), "--keyed", st.address, "key-for-triton"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        st.stop()
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = json.loads(ran.stdout)
    assert got["live"] and got["ready"]  # probes need no key
    assert got["without"] == got["aio_without"] == "StatusCode.UNAUTHENTICATED"
    assert got["with"] == got["aio_with"] == [1, 32]
    assert got["stream_without"] == "StatusCode.UNAUTHENTICATED"
    assert got["stream_with"] == "O"  # a text came: bytes, as numpy holds them
