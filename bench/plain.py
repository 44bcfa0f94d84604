"""A plain peer for the benchmarks: the Encode RPC on grpc.aio, the model run per request, nothing else.

What a developer writes first: tokenize the request's texts, run the encode graph on them as one
batch on the event loop, answer. No queue, no batching across requests, no limits, no metrics.
It serves the same API with the same runtime, so the same load generators measure it.

    python -m bench.plain --model-dir DIR --port 0 [--intra-op-threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc
import numpy as np

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from service.runtime import Runtime, RuntimeOptions


class PlainServicer(pb_grpc.AttnServeServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        encodings = self.rt.tokenizer.encode_batch(list(request.texts))
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        vectors = self.rt.encode(ids, mask).pooled_mean  # the graph pools, as for attnserve
        counts = mask.sum(1)
        return pb.EncodeResponse(
            embeddings=[
                pb.Embedding(values=v.tolist(), token_count=int(n)) for v, n in zip(vectors, counts, strict=True)
            ],
            dimensions=vectors.shape[1],
        )


async def serve(model_dir: Path, port: int, threads: int) -> None:
    rt = Runtime(model_dir, RuntimeOptions(device="cpu", intra_op_threads=threads, spin=False))
    server = grpc.aio.server()
    pb_grpc.add_AttnServeServicer_to_server(PlainServicer(rt), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    sys.stderr.write(f"gRPC on 127.0.0.1:{bound}\nserving plain\n")
    sys.stderr.flush()
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--intra-op-threads", type=int, default=0)
    args = p.parse_args()
    asyncio.run(serve(args.model_dir, args.port, args.intra_op_threads))


if __name__ == "__main__":
    main()
