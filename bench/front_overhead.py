"""What the OpenAI front costs per streamed chunk, without a GPU: a stand-in Triton (a gRPC server
that answers every request with --tokens one-token responses at once) behind the front, and an
async client streaming --concurrency requests at a time through the front, then straight over gRPC.

    python bench/front_overhead.py --concurrency 64 --requests 256 --tokens 128 --workers 1

Prints one JSON line per path: chunks/s, and the CPU seconds per chunk of the front's processes
(all workers), the stand-in server and the client. The front's CPU per chunk bounds the chunks/s
one worker can stream (1 / cpu_per_chunk); a GPU serving N tok/s at one token per response needs
N x cpu_per_chunk cores of front.
"""
import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.serving_rate import COMPLETION_TOKENS  # noqa: E402
from tests.e2e.harness import free_port  # noqa: E402


def _bytes_tensor(*values: str) -> bytes:
    return b"".join(len(v.encode()).to_bytes(4, "little") + v.encode() for v in values)


async def stand_in_triton(port: int, tokens: int):
    """ModelReady, ModelConfig and ModelStreamInfer of an `llm` model that streams `tokens` at once."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def response(i, last):
        r = service_pb2.ModelInferResponse(model_name="llm", id=str(i))
        for name, datatype in (("text_output", "BYTES"), ("finish_reason", "BYTES"),
                               ("num_input_tokens", "UINT32"), ("num_output_tokens", "UINT32")):
            r.outputs.add(name=name, datatype=datatype, shape=[1])
        r.raw_output_contents.extend([_bytes_tensor(" to"), _bytes_tensor("length" if last else "None"),
                                      (8).to_bytes(4, "little"), (1).to_bytes(4, "little")])
        return service_pb2.ModelStreamInferResponse(infer_response=r)

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelReady(self, request, context):
            return service_pb2.ModelReadyResponse(ready=True)

        async def ModelStreamInfer(self, requests, context):
            async for _ in requests:
                for i in range(tokens):
                    yield response(i, i == tokens - 1)

    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def cpu_seconds(pids) -> float:
    """utime + stime of the processes and their children that are still there."""
    total = 0.0
    for pid in pids:
        for p in [pid] + [int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                        text=True).stdout.split()]:
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                pass
    return total


async def through_front(url, concurrency, requests, tokens):
    import aiohttp
    body = json.dumps({"model": "llm", "prompt": "x", "max_tokens": tokens, "stream": True,
                       "stream_options": {"include_usage": True, "continuous_usage_stats": True}}).encode()
    seats, chunks = asyncio.Semaphore(concurrency), [0]

    async def one(session):
        async with seats:
            async with session.post(f"{url}/v1/completions", data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                async for line in r.content:
                    if line.startswith(b"data: {") and COMPLETION_TOKENS.search(line):
                        chunks[0] += 1
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(one(session) for _ in range(requests)))
    return chunks[0]


async def straight(grpc_url, concurrency, requests, tokens):
    import tritonclient.grpc.aio as aioclient
    from bench.serving_rate import PlannedRequest, request_inputs
    inputs = request_inputs(PlannedRequest(0, "chat", 1, tokens, 0.0, "x"))
    client, seats, chunks = aioclient.InferenceServerClient(grpc_url), asyncio.Semaphore(concurrency), [0]

    async def one():
        async def the_request():
            yield {"model_name": "llm", "inputs": inputs}
        async with seats:
            async for result, error in client.stream_infer(the_request()):
                chunks[0] += 1
    await asyncio.gather(*(one() for _ in range(requests)))
    await client.close()
    return chunks[0]


def measure(label, run, processes: dict):
    """Run the client; CPU per chunk of each named group of processes ({name: [pids]}) and of the client."""
    cpu0 = {name: cpu_seconds(pids) for name, pids in processes.items()}
    client0, t0 = time.process_time(), time.perf_counter()
    chunks = asyncio.run(run())
    wall = time.perf_counter() - t0
    row = dict(path=label, chunks=chunks, wall_s=round(wall, 2), chunks_per_s=round(chunks / wall),
               client_cpu_us_per_chunk=round((time.process_time() - client0) / chunks * 1e6, 1))
    for name, pids in processes.items():
        row[f"{name}_cpu_us_per_chunk"] = round((cpu_seconds(pids) - cpu0[name]) / chunks * 1e6, 1)
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128, help="one-token responses per request")
    ap.add_argument("--workers", type=int, default=1, help="the front's --workers")
    a = ap.parse_args(argv)
    grpc_port, http_port = free_port(), free_port()
    stand_in = subprocess.Popen([sys.executable, "-c", "import asyncio, sys; sys.path.insert(0, sys.argv[1]); "
                                 "from bench.front_overhead import stand_in_triton; "
                                 "asyncio.run(stand_in_triton(int(sys.argv[2]), int(sys.argv[3])))",
                                 REPO, str(grpc_port), str(a.tokens)], cwd=REPO)
    front = subprocess.Popen([sys.executable, "-m", "entrypoints.api_server", "--port", str(http_port),
                              "--triton-url", f"127.0.0.1:{grpc_port}", "--workers", str(a.workers)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http_port}"
    try:
        import urllib.request
        for _ in range(300):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        grpc_url = f"127.0.0.1:{grpc_port}"
        front_row = measure("openai front", lambda: through_front(url, a.concurrency, a.requests, a.tokens),
                            {"front": [front.pid], "stand_in": [stand_in.pid]})
        grpc_row = measure("grpc", lambda: straight(grpc_url, a.concurrency, a.requests, a.tokens),
                           {"stand_in": [stand_in.pid]})
        return front_row, grpc_row
    finally:
        for p in (front, stand_in):
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
