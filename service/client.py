"""``attnserve client encode|attention|info``: a command-line client of a running server.

``attention --png DIR`` also draws one heatmap per layer and head (tokens on both axes),
since people would rather look at these maps than read them; that needs matplotlib (the
``train`` extra), which the server itself does not.

The client imports gRPC, the generated API and numpy, never the server's modules: ``client
health`` is a container's health probe, run every few seconds, and must start fast. With
``--tls-ca`` it speaks TLS, and with ``--tls-cert``/``--tls-key`` it presents a client
certificate (for servers started with ``--tls-client-ca``). With ``--api-key`` (or
``ATTNSERVE_CLIENT_API_KEY``, which keeps it out of the process list) every call carries it as
``authorization: Bearer <key>``, for servers started with ``--api-keys-file``.

The model's calls are tried again (``--retries``, 2 by default) where the server refused them before
doing any work: UNAVAILABLE (a server draining for shutdown) and RESOURCE_EXHAUSTED (a full server,
or a client over its own limits), by gRPC's own retry policy (``service_config``), which waits as
the server says in ``grpc-retry-pushback-ms`` where it says, and backs off exponentially where not.
An error is written with its code, its reason (the ErrorInfo's) and its message:
``RESOURCE_EXHAUSTED (QUEUE_FULL): encode queue is full (1024 waiting); retry later``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import grpc
import numpy as np

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc


def decode_probabilities(response: pb.AttentionMapResponse) -> np.ndarray:
    """The packed map of a response as an array of its shape."""
    dtype = "<f2" if response.precision == pb.PRECISION_FP16 else "<f4"
    return np.frombuffer(response.probabilities, dtype=dtype).reshape(tuple(response.shape))


class _Key(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <key>`` to every call. (gRPC's call credentials do the same, but
    only on a TLS channel, and a server may take its TLS from a mesh in front of it.)"""

    def __init__(self, key: str) -> None:
        self.header = ("authorization", f"Bearer {key}")

    def _with_key(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(d.metadata or ()), self.header]
        return _Details(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._with_key(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._with_key(details), requests)


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    """A call's details, its metadata replaced."""


def service_config(retries: int) -> str:
    """gRPC's service config for a channel to the server: the model's calls (AttnServe's, and the v2
    service's ModelInfer) tried again up to ``retries`` times (at most 4) where the server refused
    them before any work, after what ``grpc-retry-pushback-ms`` says, else 0.1 s doubling to 2 s
    (with gRPC's jitter). Health is not: a probe wants the answer of now.

    With gRPC's retry throttling, as its retry design sets it out: a channel holds 10 tokens, each
    call refused takes one and each served gives back a tenth, and below half no call is tried again.
    A lone refusal among calls served is retried; behind a server at its bound, where most calls are
    refused, the channel stops multiplying them by ``retries + 1``."""
    if not 0 <= retries <= 4:
        raise ValueError(f"--retries must be 0 to 4 (gRPC tries a call at most 5 times), got {retries}")
    names = [
        {"service": "attnserve.v1.AttnServe"},
        {"service": "inference.GRPCInferenceService", "method": "ModelInfer"},
    ]
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    if not retries:
        return json.dumps({"methodConfig": [{"name": names}]})
    throttling = {"maxTokens": 10, "tokenRatio": 0.1}
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}], "retryThrottling": throttling})


def channel(
    address: str,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    server_name: str | None = None,
    api_key: str | None = None,
    retries: int = 2,
) -> grpc.Channel:
    """A channel to the server: plain, TLS (tls_ca: the CA that signed the server's certificate), or
    mutual TLS (also the client's own certificate and key); with ``api_key``, every call carries it;
    the model's calls refused before any work are tried again up to ``retries`` times (``service_config``)."""
    options: list[tuple[str, str]] = [("grpc.service_config", service_config(retries))]
    if tls_ca is None and tls_cert is None:
        ch = grpc.insecure_channel(address, options=options)
    else:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        creds = grpc.ssl_channel_credentials(
            root_certificates=tls_ca.read_bytes() if tls_ca else None,
            private_key=tls_key.read_bytes() if tls_key else None,
            certificate_chain=tls_cert.read_bytes() if tls_cert else None,
        )
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        ch = grpc.secure_channel(address, creds, options=options)
    return grpc.intercept_channel(ch, _Key(api_key)) if api_key else ch


def heatmaps(response: pb.AttentionMapResponse, out_dir: Path) -> list[Path]:
    """One PNG per (layer, head): query tokens down, key tokens across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = decode_probabilities(response).astype(np.float32)
    labels = [t.replace("\n", "\\n") for t in response.tokens]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    size = max(4.0, 0.3 * len(labels) + 2)
    for li, layer in enumerate(response.layers):
        for hi, head in enumerate(response.heads):
            fig, ax = plt.subplots(figsize=(size, size))
            im = ax.imshow(probs[li, hi], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
            ax.set_title(f"layer {layer}, head {head}")
            fig.colorbar(im, ax=ax, fraction=0.046)
            fig.tight_layout()
            path = out_dir / f"layer{layer}_head{head}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths


TRUNCATION = {"error": pb.TRUNCATION_ERROR, "end": pb.TRUNCATION_END, "start": pb.TRUNCATION_START}
PRIORITY = {
    None: pb.PRIORITY_UNSPECIFIED,
    "high": pb.PRIORITY_HIGH,
    "normal": pb.PRIORITY_NORMAL,
    "low": pb.PRIORITY_LOW,
}


def dropped(usage: pb.Usage) -> str:
    return f", the prompt's first tokens dropped to {usage.prompt_tokens}" if usage.prompt_truncated else ""


def main(args: argparse.Namespace) -> int:
    try:
        ch = channel(
            args.address, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name, args.api_key, args.retries
        )
    except (OSError, ValueError) as problem:
        sys.stderr.write(f"attnserve client: {problem}\n")
        return 2
    client = pb_grpc.AttnServeStub(ch)
    try:
        if args.client_command == "encode":
            pooling = pb.POOLING_LAST if args.pooling == "last" else pb.POOLING_MEAN
            request = pb.EncodeRequest(
                texts=args.texts,
                pooling=pooling,
                normalize=args.normalize,
                truncation=TRUNCATION[args.truncation],
                priority=PRIORITY[args.priority],
            )
            r = client.Encode(request, timeout=args.timeout)
            for text, e in zip(args.texts, r.embeddings, strict=True):
                head = ", ".join(f"{v:.4f}" for v in e.values[:6])
                cut = f" (truncated at its {args.truncation})" if e.truncated else ""
                sys.stdout.write(f"{text!r}: {e.token_count} tokens{cut}, [{head}, ...] ({r.dimensions} dims)\n")
            t = r.timings
            sys.stdout.write(f"queue {t.queue_seconds * 1e3:.2f} ms, compute {t.compute_seconds * 1e3:.2f} ms\n")
        elif args.client_command == "attention":
            req = pb.AttentionMapRequest(
                text=args.text,
                layers=args.layers or [],
                heads=args.heads or [],
                truncation=TRUNCATION[args.truncation],
                priority=PRIORITY[args.priority],
            )
            r = client.AttentionMap(req, timeout=args.timeout)
            probs = decode_probabilities(r)
            sys.stdout.write(f"tokens: {list(r.tokens)}\nshape (layers, heads, query, key): {tuple(r.shape)}\n")
            for li, layer in enumerate(r.layers):
                mean = probs[li].mean(0)  # (T, T), averaged over heads
                top = [int(np.argmax(row)) for row in mean]
                pairs = ", ".join(f"{r.tokens[q]!r}->{r.tokens[k]!r}" for q, k in enumerate(top))
                sys.stdout.write(f"layer {layer}, most attended key per query: {pairs}\n")
            if args.png:
                try:
                    paths = heatmaps(r, args.png)
                except ImportError:
                    sys.stderr.write("heatmaps need matplotlib: pip install 'attnserve[train]'\n")
                    return 1
                for p in paths:
                    sys.stdout.write(f"wrote {p}\n")
        elif args.client_command == "health":
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
            sys.stdout.write(name + "\n")
            return 0 if status.status == health_pb2.HealthCheckResponse.SERVING else 1
        elif args.client_command == "generate":
            req = pb.GenerateRequest(
                prompt=args.prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                stop=args.stop or [],
                logprobs=False,
                return_attention=args.attention,
                attention_top_k=3,
                truncation=TRUNCATION[args.truncation],
                priority=PRIORITY[args.priority],
            )
            if args.seed is not None:
                req.seed = args.seed
            if args.stream:
                sys.stdout.write(args.prompt)
                for msg in client.GenerateStream(req, timeout=args.timeout):
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
                    if msg.finish_reason:
                        reason = pb.FinishReason.Name(msg.finish_reason)
                        sys.stdout.write(f"\n[{reason}, {msg.usage.generated_tokens} tokens{dropped(msg.usage)}]\n")
            elif args.attention:
                g = client.Generate(req, timeout=args.timeout)
                prompt_tokens = client.Tokenize(pb.TokenizeRequest(texts=[args.prompt])).tokenizations[0].tokens
                seen = list(prompt_tokens)[len(prompt_tokens) - g.usage.prompt_tokens :]  # those the model read
                sys.stdout.write("token <- what the last layer attended to most (averaged over heads)\n")
                for t in g.tokens:
                    last = t.attention[-1]
                    why = ", ".join(f"{seen[p]!r} {w:.2f}" for p, w in zip(last.positions, last.weights, strict=True))
                    sys.stdout.write(f"{t.text!r:>14} <- {why}\n")
                    seen.append(t.text)
            else:
                g = client.Generate(req, timeout=args.timeout)
                sys.stdout.write(args.prompt + g.text + "\n")
                sys.stdout.write(
                    f"[{pb.FinishReason.Name(g.finish_reason)}, {g.usage.generated_tokens} tokens{dropped(g.usage)}, "
                    f"first token after {g.time_to_first_token_seconds * 1e3:.1f} ms]\n"
                )
        else:
            r = client.GetModelInfo(pb.GetModelInfoRequest(), timeout=args.timeout)
            from google.protobuf.json_format import MessageToDict

            info = MessageToDict(r)
            info["configJson"] = json.loads(r.config_json)
            sys.stdout.write(json.dumps(info, indent=2) + "\n")
    except grpc.RpcError as e:
        why = error_reason(e)
        sys.stderr.write(f"{e.code().name}{f' ({why})' if why else ''}: {e.details()}\n")
        return 1
    return 0


def error_reason(e: grpc.RpcError) -> str:
    """The reason an error's google.rpc.ErrorInfo gives (attnserve's README lists them), or "" where
    it carried none (gRPC's own errors, an error past the size the server sends details at)."""
    from google.rpc import error_details_pb2, status_pb2

    raw = dict(e.trailing_metadata() or ()).get("grpc-status-details-bin")  # type: ignore[attr-defined]
    if not isinstance(raw, bytes):
        return ""
    info = error_details_pb2.ErrorInfo()
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Unpack(info):
            return info.reason
    return ""
