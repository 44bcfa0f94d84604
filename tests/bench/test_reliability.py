"""The reliability benchmark's loads are calls the server serves, and its report names each overload."""

from __future__ import annotations

from pathlib import Path

import grpc

from bench.reliability import PROMPTS, encode_calls, generate_calls, priorities, reload, table
from tests.service.conftest import ServerThread, config


def test_the_overload_calls_are_served(model_dir: Path) -> None:
    st = ServerThread(config(model_dir)).start()
    try:
        stub = st.stub()
        generate, encode = generate_calls(4), encode_calls(["the king speaks", "a fool"], 3)
        for k in (0, 1, 31, 32):
            reply = generate(stub, k, 30)
            assert 1 <= reply.usage.generated_tokens <= 4
            assert len(encode(stub, k, 30).embeddings) == 3
        assert len(set(PROMPTS)) == 32  # every call of a round asks something else
    finally:
        st.stop()


def overload(**kw: object) -> dict[str, object]:
    return {
        "factor": 3.0,
        "deadline_seconds": 0.5,
        "capacity_per_second": 300.0,
        "offered_per_second": 900.0,
        "sent": 13_000,
        "codes": {"OK": 3000, grpc.StatusCode.RESOURCE_EXHAUSTED.name: 10_000},
        "goodput_per_second": 200.0,
        "goodput_share_of_capacity": 0.667,
        "accepted": {"p50_ms": 300.0, "p99_ms": 450.0},
        "refused": {"p50_ms": 1.2, "p99_ms": 20.0, "max_ms": 40.0},
        "health_checks": 147,
        "health_failures": 0,
        **kw,
    }


def test_the_report_names_each_overload() -> None:
    text = table(
        {
            "machine": "2 cores",
            "overload": overload(texts_per_request=16, tokens_per_text=64, deadline_seconds=2.0),
            "generate_overload": overload(max_new_tokens=64),
        }
    )
    assert "Encode, 16 texts a request (64 tokens each), 2 s deadlines" in text
    assert "Generate, up to 64 tokens, 0.5 s deadlines" in text
    assert text.count("goodput") == 2 and "67% of capacity" in text


def test_models_loaded_under_load_lose_no_call(model_dir: Path) -> None:
    r = reload(model_dir, seconds=6.0, reloads=2)
    codes = r["codes"]
    assert set(codes) == {"Encode OK", "GenerateStream OK"}, codes  # nothing refused, nothing cut off
    assert len(r["loads"]) == 2 and all(0 < x["seconds"] < 3 for x in r["loads"])
    assert r["during"]["calls"] > 0 and r["outside"]["calls"] > 0
    text = table({"machine": "2 cores", "reload": r})
    assert "reload: 2 new models in 6 s" in text and "serving the new model after SIGHUP" in text


def test_the_priority_rounds_alternate_the_two_ways_and_are_reported(model_dir: Path) -> None:
    r = priorities(model_dir, seconds=1.0, rounds=1)
    for rounds, units in ((r["rounds"], "texts"), (r["generate_rounds"], "tokens")):
        assert [one["marked"] for one in rounds] == [False, True]
        for one in rounds:
            assert one[f"bulk_{units}_per_second"] > 0 and one["interactive_codes"].get("OK", 0) > 0, one
    text = table({"machine": "2 cores", "priority": r})
    assert text.count("no priorities") == 2 and text.count("bulk low, interactive high") == 2
    assert "interactive p50" in text and "texts/s" in text and "tokens/s" in text
