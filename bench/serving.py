"""Serving benchmark: a real tritonserver with the llm model (random weights of a shape), driven by
our gRPC streaming client at several concurrency levels.

usage: python bench/serving.py --shape llama3-8b --concurrency 1 16 64 256 --input-len 512 512 --output-len 256
Prints one JSON line per concurrency: TTFT and ITL p50/p99 (ms), output tok/s, request/s.
"""
import argparse
import json
import os
import queue
import random
import sys
import tempfile
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.shapes import ids_to_text, make_shape_dir  # noqa: E402
from tests.e2e.harness import Server, make_model_repository  # noqa: E402


def request_inputs(prompt: str, max_tokens: int):
    def tensor(name, value, dtype):
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else bool))
        return t
    params = json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    return [tensor("text_input", prompt.encode(), "BYTES"), tensor("stream", True, "BOOL"),
            tensor("sampling_parameters", params.encode(), "BYTES"),
            tensor("return_num_output_tokens", True, "BOOL")]


def worker(url, jobs, results):
    client = grpcclient.InferenceServerClient(url)
    events = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((time.perf_counter(), result, error)))
    while True:
        try:
            i, prompt, max_tokens = jobs.get_nowait()
        except queue.Empty:
            break
        t0 = time.perf_counter()
        client.async_stream_infer("llm", request_inputs(prompt, max_tokens), request_id=str(i),
                                  enable_empty_final_response=True)
        arrivals = []   # (time, tokens in this response)
        while True:
            t, result, error = events.get()
            if error is not None:
                raise RuntimeError(error)
            response = result.get_response()
            counts = result.as_numpy("num_output_tokens")
            if counts is not None and int(counts.sum()):
                arrivals.append((t, int(counts.sum())))
            if response.parameters["triton_final_response"].bool_param:
                break
        results.append((t0, arrivals))
    client.stop_stream()
    client.close()


def run_level(url, concurrency, prompts, max_tokens):
    jobs = queue.Queue()
    for i, p in enumerate(prompts):
        jobs.put((i, p, max_tokens))
    results = []
    threads = [threading.Thread(target=worker, args=(url, jobs, results)) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ttft, itl, tokens = [], [], 0
    for start, arrivals in results:
        ttft.append(arrivals[0][0] - start)
        for (t_prev, _), (t, k) in zip(arrivals, arrivals[1:]):
            itl += [(t - t_prev) / k] * k   # a response of k tokens: k tokens at the mean gap
        tokens += sum(k for _, k in arrivals)
    pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1e3, 2)  # noqa: E731
    return dict(concurrency=concurrency, requests=len(results), output_tokens=tokens, seconds=round(elapsed, 2),
                output_tok_s=round(tokens / elapsed, 1), request_s=round(len(results) / elapsed, 2),
                ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99), itl_p50_ms=pct(itl, 50), itl_p99_ms=pct(itl, 99))


def run_perf_analyzer(server, concurrency, prompts, max_tokens, workdir):
    """The standard tool against the same server: perf_analyzer --streaming over gRPC."""
    import shutil
    import subprocess
    exe = shutil.which("perf_analyzer")
    if exe is None:
        print(json.dumps(dict(tool="perf_analyzer", error="not on PATH")))
        return
    data = {"data": [{"text_input": [p], "stream": [True],
                      "sampling_parameters": [json.dumps({"max_tokens": max_tokens, "temperature": 0,
                                                          "ignore_eos": True})]} for p in prompts]}
    path = os.path.join(workdir, "pa_input.json")
    with open(path, "w") as f:
        json.dump(data, f)
    cmd = [exe, "-m", "llm", "-i", "grpc", "-u", server.grpc_url, "--streaming", "--async", "--input-data", path,
           "--concurrency-range", str(concurrency), "--measurement-interval", "15000", "--stability-percentage", "50"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    print("$ " + " ".join(cmd[:1] + ["-m", "llm"] + cmd[3:]))
    print(r.stdout[-3000:] + r.stderr[-1500:], flush=True)


def shape_dir_of(shape):
    """config.json and tokenizer of a benchmark shape, made once per machine."""
    return make_shape_dir(shape, os.path.join(tempfile.gettempdir(), "llm-bench-shapes"))


def start_shape_server(shape, workdir, **parameters):
    """tritonserver (tools/serve.py) serving the llm model with random weights of `shape`; other
    config.pbtxt parameters as given. Returns the Server, started but not yet ready."""
    parameters = dict(dict(load_format="dummy", max_num_seqs="256"), **parameters)
    repo = make_model_repository(os.path.join(workdir, "repo"), shape_dir_of(shape), **parameters)
    return Server(repo, os.path.join(workdir, "server.log")).start()


def wait_ready_or_show_errors(server, timeout=600):
    """Wait for the model (a large shape loads for minutes); on failure print the log's errors."""
    try:
        return server.wait_ready(timeout=timeout)
    except BaseException:
        log = server.log()
        print("\n".join(l for l in log.splitlines() if "rror" in l or "Traceback" in l or "File " in l)[-6000:])
        raise


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: max(2 x concurrency, 8), 256 at most")
    ap.add_argument("--input-len", type=int, nargs=2, default=[512, 512])
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", default="8192")
    ap.add_argument("--engine-core-process", action="store_true", help="the engine core in a process of its own")
    ap.add_argument("--out", default="")
    ap.add_argument("--perf-analyzer", type=int, default=0, metavar="CONCURRENCY",
                    help="also run perf_analyzer --streaming at this concurrency")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="llm-serving-")
    server = start_shape_server(a.shape, tmp, max_num_batched_tokens=a.max_num_batched_tokens,
                                max_model_len=str(a.input_len[1] + a.output_len + 16),
                                engine_core_process=str(a.engine_core_process).lower())
    rng = random.Random(0)
    lines = []
    try:
        wait_ready_or_show_errors(server)
        for c in a.concurrency:
            n = a.requests_per_level or min(max(2 * c, 8), 256)
            prompts = [ids_to_text(rng.randrange(10000) for _ in range(rng.randint(*a.input_len))) for _ in range(n)]
            run_level(server.grpc_url, min(c, 4), prompts[:4], 8)   # warm-up
            line = dict(engine="ours-triton", shape=a.shape, input_len=a.input_len, output_len=a.output_len,
                        **run_level(server.grpc_url, c, prompts, a.output_len))
            print(json.dumps(line), flush=True)
            lines.append(line)
        if a.perf_analyzer:
            prompts = [ids_to_text(rng.randrange(10000) for _ in range(rng.randint(*a.input_len))) for _ in range(64)]
            run_perf_analyzer(server, a.perf_analyzer, prompts, a.output_len, tmp)
    finally:
        server.stop()
        if a.out:
            with open(a.out, "w") as f:
                f.write(server.log()[-200000:])
    return lines


if __name__ == "__main__":
    main()
