"""Serving benchmark by request rate: Poisson arrivals against a real tritonserver serving the llm model.

One gRPC channel and asyncio: each request is a gRPC stream of its own (multiplexed on the one
connection), so every request is timed independently and the client needs no thread per request.
Per rate it prints one JSON line: TTFT (all, chat-sized, long), ITL, TPOT, stall and e2e
percentiles (p50/p90/p99/p99.9, ms), output tok/s, request/s, goodput under a stated SLO, and the
client's own CPU use (process CPU time / wall time; 1.0 = one core busy).

    # against a running server (e.g. `python tools/serve.py`), prompts built for its tokenizer
    python bench/serving_rate.py --url 127.0.0.1:8001 --tokenizer DIR --rates 8 16 24 --workload mixed
    # or start tritonserver with random weights of a shape (as bench/serving.py does)
    python bench/serving_rate.py --shape llama3-8b --max-num-batched-tokens 2048 --rates 8 16 24

Definitions (as in issue 11):
- TTFT: from sending a request to its first response with tokens.
- ITL: the gap between two responses of a request divided by the tokens in the later one, counted
  once per token (the server merges tokens into one response when it is busy).
- TPOT: (e2e - TTFT) / (tokens - 1) per request.  Stall: a request's largest gap between responses.
- e2e: from sending to the last response with tokens.
Every request is greedy with `ignore_eos` and `max_tokens` = its wanted output length, so each
produces exactly that many tokens (checked: `wrong_length` counts the others).
"""
import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MODEL_NAME = "llm"
PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "p999": 99.9}

# ------------------------------------------------------------------------------------ workloads

# The mixed workload: chat turns beside long documents.
CHAT_SHARE = 0.85
CHAT_INPUT, CHAT_OUTPUT = (64, 512), (32, 384)
LONG_INPUT, LONG_OUTPUT = (2048, 6000), (16, 64)

# ShareGPT-like: log-normal lengths with long tails (our parameters, not fitted to the data set):
# inputs median 256 tokens, sigma 1.0 (p90 ~ 920), clipped to [16, 4096]; outputs median 128,
# sigma 0.9 (p90 ~ 405), clipped to [8, 1024]. Inputs of LONG_PROMPT tokens or more count as long.
SHAREGPT_INPUT = dict(median=256, sigma=1.0, low=16, high=4096)
SHAREGPT_OUTPUT = dict(median=128, sigma=0.9, low=8, high=1024)
LONG_PROMPT = 2048


def mixed_lengths(rng):
    """(kind, input tokens, output tokens) of one request of the mixed workload."""
    if rng.random() < CHAT_SHARE:
        return "chat", rng.randint(*CHAT_INPUT), rng.randint(*CHAT_OUTPUT)
    return "long", rng.randint(*LONG_INPUT), rng.randint(*LONG_OUTPUT)


def clipped_lognormal(rng, median, sigma, low, high):
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))


def sharegpt_lengths(rng):
    input_len = clipped_lognormal(rng, **SHAREGPT_INPUT)
    output_len = clipped_lognormal(rng, **SHAREGPT_OUTPUT)
    return ("long" if input_len >= LONG_PROMPT else "chat"), input_len, output_len


WORKLOADS = {"mixed": (mixed_lengths, LONG_INPUT[1] + LONG_OUTPUT[1]),
             "sharegpt": (sharegpt_lengths, SHAREGPT_INPUT["high"] + SHAREGPT_OUTPUT["high"])}


def fixed_workload(input_len, output_len):
    """The offline benchmark's shape (bench/offline.py): inputs uniform in input_len, a fixed output."""
    return (lambda rng: ("chat", rng.randint(*input_len), output_len)), input_len[1] + output_len


def workload_of(a):
    """(lengths function, longest request) of --workload ("fixed": --input-len and --output-len)."""
    return fixed_workload(a.input_len, a.output_len) if a.workload == "fixed" else WORKLOADS[a.workload]


def scaled(length, scale, least):
    """--scale shrinks the lengths for small models and CPU runs; the kind keeps its unscaled meaning."""
    return max(least, round(length * scale))


# ------------------------------------------------------------------------------------ prompts

class PromptBuilder:
    """Text that the served tokenizer encodes to an exact number of tokens.

    Random words of the vocabulary that are one token each when preceded by a space: prompts then
    share no prefix, which matters since the engine's prefix cache would make repeated prefills
    nearly free. The count includes the tokens the tokenizer adds (e.g. BOS), as the engine counts.
    """

    def __init__(self, tokenizer_dir, seed=0, candidates=8192):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        self.words = self._one_token_words(random.Random(seed), candidates)
        self.added_tokens = self.count(" " + self.words[0]) - 1

    def _one_token_words(self, rng, candidates):
        vocab_size = self.tokenizer.get_vocab_size()
        ids = rng.sample(range(vocab_size), min(candidates, vocab_size))
        words = {w for w in (self.tokenizer.decode([i]).strip() for i in ids)
                 if w.isascii() and w.isalnum()
                 and len(self.tokenizer.encode(" " + w, add_special_tokens=False).ids) == 1}
        if len(words) < 16:
            raise ValueError(f"the tokenizer has only {len(words)} one-token words among {len(ids)} ids; "
                             "prompts of a known length cannot be built from it")
        return sorted(words)   # sorted: a set's order changes with the hash seed, the prompts must not

    def count(self, text):
        return len(self.tokenizer.encode(text).ids)

    def build(self, num_tokens, rng):
        words = rng.choices(self.words, k=max(1, num_tokens - self.added_tokens))
        # One round is exact for tokenizers that split at spaces; the others get a few corrections.
        for _ in range(4):
            text = "".join(" " + w for w in words)
            missing = num_tokens - self.count(text)
            if missing == 0:
                break
            if missing > 0:
                words += rng.choices(self.words, k=missing)
            else:
                del words[max(1, len(words) + missing):]
        return text


# ------------------------------------------------------------------------------------ the plan

@dataclass
class PlannedRequest:
    index: int
    kind: str            # "chat" or "long"
    input_len: int       # tokens, as the served tokenizer counts them
    output_len: int
    arrival_s: float     # offset from the start of the run
    prompt: str


def poisson_arrivals(rng, rate, duration_s=0.0, num_requests=0):
    """Arrival offsets of a Poisson process: num_requests of them, or all within duration_s."""
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if (num_requests and len(times) == num_requests) or (not num_requests and t > duration_s):
            return times
        times.append(t)


def plan_requests(workload, rate, prompts, seed=0, duration_s=60.0, num_requests=0, scale=1.0, lengths=None,
                  text_salt=""):
    """The requests of one rate; the same seed, workload and rate give the same plan. `lengths`:
    the workload's lengths function where it is not one of WORKLOADS. `text_salt` changes only the
    prompts' words: the same arrivals and lengths with other text, which the prefix cache has not seen."""
    rng = random.Random(f"{seed}:{workload}:{rate}")   # a str seed is hashed the same in every process
    text_rng = random.Random(f"{seed}:{workload}:{rate}:text{text_salt}")
    lengths = lengths or WORKLOADS[workload][0]
    planned = []
    for i, arrival in enumerate(poisson_arrivals(rng, rate, duration_s, num_requests)):
        kind, input_len, output_len = lengths(rng)
        input_len = scaled(input_len, scale, prompts.added_tokens + 1)
        output_len = scaled(output_len, scale, 2)   # two tokens at least, so that TPOT is defined
        planned.append(PlannedRequest(i, kind, input_len, output_len, arrival, prompts.build(input_len, text_rng)))
    return planned


def request_inputs(planned):
    """The vLLM backend's inputs: a stream of deltas, each with its token count."""
    import tritonclient.grpc as grpcclient

    def tensor(name, value, dtype):
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else bool))
        return t
    sampling = json.dumps({"max_tokens": planned.output_len, "temperature": 0, "ignore_eos": True})
    return [tensor("text_input", planned.prompt.encode(), "BYTES"), tensor("stream", True, "BOOL"),
            tensor("exclude_input_in_output", True, "BOOL"),
            tensor("sampling_parameters", sampling.encode(), "BYTES"),
            tensor("return_num_output_tokens", True, "BOOL"), tensor("return_num_input_tokens", True, "BOOL")]


# ------------------------------------------------------------------------------------ the client

@dataclass
class RequestRecord:
    planned: PlannedRequest
    sent: float = 0.0                                 # perf_counter() when the stream started
    responses: list = field(default_factory=list)     # (perf_counter(), tokens) of responses with tokens
    num_input_tokens: int = 0
    error: str = ""


COUNT_OUTPUTS = ("num_output_tokens", "num_input_tokens")


def token_counts(response):
    """{output name: count} of a ModelInferResponse's UINT32 count outputs (summed over samples).

    Read from the raw bytes (little-endian, as Triton sends them) rather than through
    InferResult.as_numpy: the client's CPU per response is what bounds the rate it can drive."""
    return {out.name: sum(memoryview(raw).cast("I"))
            for out, raw in zip(response.outputs, response.raw_output_contents) if out.name in COUNT_OUTPUTS}


async def stream_one(client, record, inputs, timeout_s):
    """One request on a gRPC stream of its own; the stream ends after the request's final response."""
    async def the_request():
        yield {"model_name": MODEL_NAME, "inputs": inputs, "request_id": str(record.planned.index)}
    record.sent = time.perf_counter()
    try:
        async for result, error in client.stream_infer(the_request(), stream_timeout=timeout_s):
            now = time.perf_counter()
            if error is not None:
                record.error = str(error)
                continue
            counts = token_counts(result.get_response())
            if counts.get("num_output_tokens"):
                record.responses.append((now, counts["num_output_tokens"]))
            record.num_input_tokens = max(record.num_input_tokens, counts.get("num_input_tokens", 0))
    except Exception as e:  # noqa: BLE001 -- a broken connection fails this request, not the run
        record.error = f"{type(e).__name__}: {e}"


COMPLETION_TOKENS = re.compile(rb'"completion_tokens": (\d+)')
PROMPT_TOKENS = re.compile(rb'"prompt_tokens": (\d+)')


def openai_body(planned):
    """The same request through the OpenAI front: every chunk carries the usage so far (vLLM's
    continuous_usage_stats), so that each response's tokens are counted as on gRPC."""
    return json.dumps({"model": MODEL_NAME, "prompt": planned.prompt, "max_tokens": planned.output_len,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True, "continuous_usage_stats": True}}).encode()


async def stream_one_openai(session, url, record, body, timeout_s):
    """One request as server-sent events from /v1/completions; counts read off the raw bytes."""
    import aiohttp
    record.sent = time.perf_counter()
    seen = 0
    try:
        async with session.post(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                if b'"error"' in line[:20]:
                    record.error = line.decode(errors="replace")[:200]
                    continue
                counted = COMPLETION_TOKENS.search(line)
                if counted and int(counted.group(1)) > seen:
                    record.responses.append((now, int(counted.group(1)) - seen))
                    seen = int(counted.group(1))
                prompt_tokens = PROMPT_TOKENS.search(line)
                if prompt_tokens:
                    record.num_input_tokens = int(prompt_tokens.group(1))
    except Exception as e:  # noqa: BLE001 -- a broken connection fails this request, not the run
        record.error = f"{type(e).__name__}: {e}"


@dataclass
class RunResult:
    records: list
    start: float          # perf_counter() of arrival offset 0
    wall_s: float         # start to the last response
    client_cpu_s: float   # this process's CPU time (all threads, gRPC's included) over the run
    loop_cpu_s: float     # the event loop thread's share of it: near wall_s, the client would be the limit
    send_lags_s: list     # how late each request left against its planned arrival


async def run_plan(url, planned, request_timeout_s=600.0, concurrency=0, api="grpc"):
    """Send the planned requests at their arrival times; wait for all to finish. api "grpc": over
    one gRPC channel (url host:port); "openai": to the OpenAI front (url http://host:port), an HTTP
    connection per request in flight (server-sent events need one each).
    concurrency > 0: a closed loop instead, at most that many requests in flight (arrivals ignored)."""
    records = [RequestRecord(p) for p in planned]
    if api == "openai":
        import aiohttp
        bodies = [openai_body(p) for p in planned]
        client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

        def one(record, body):
            return stream_one_openai(client, url, record, body, request_timeout_s)
    else:
        import tritonclient.grpc.aio as aioclient
        bodies = [request_inputs(p) for p in planned]   # built up front: the run's CPU is the client's own
        client = aioclient.InferenceServerClient(url)

        def one(record, inputs):
            return stream_one(client, record, inputs, request_timeout_s)
    try:
        tasks, lags = [], []
        cpu0, loop_cpu0, start = time.process_time(), time.thread_time(), time.perf_counter()
        if concurrency:
            seats = asyncio.Semaphore(concurrency)

            async def seated(record, body):
                async with seats:
                    await one(record, body)
            tasks = [seated(r, b) for r, b in zip(records, bodies)]
        else:
            for record, body in zip(records, bodies):
                due = start + record.planned.arrival_s
                if due > time.perf_counter():
                    await asyncio.sleep(due - time.perf_counter())
                lags.append(max(0.0, time.perf_counter() - due))
                tasks.append(asyncio.create_task(one(record, body)))
        await asyncio.gather(*tasks)
        end = max([start] + [r.responses[-1][0] for r in records if r.responses])
        return RunResult(records, start, end - start, time.process_time() - cpu0,
                         time.thread_time() - loop_cpu0, lags)
    finally:
        await client.close()


# ------------------------------------------------------------------------------------ statistics

@dataclass
class Timings:
    ttft: float
    e2e: float
    tokens: int
    itls: list            # one entry per token after the first response's
    stall: float          # largest gap between two responses (0 with one response)
    tpot: float           # nan with one token

    def itl_p99(self):
        return float(np.percentile(self.itls, 99)) if self.itls else 0.0


def request_timings(record):
    """Timings of a completed request (None for one that failed or produced nothing)."""
    if record.error or not record.responses:
        return None
    times = [t for t, _ in record.responses]
    tokens = sum(k for _, k in record.responses)
    itls, gaps = [], []
    for (t_prev, _), (t, k) in zip(record.responses, record.responses[1:]):
        gaps.append(t - t_prev)
        itls += [(t - t_prev) / k] * k
    ttft, e2e = times[0] - record.sent, times[-1] - record.sent
    tpot = (e2e - ttft) / (tokens - 1) if tokens > 1 else float("nan")
    return Timings(ttft, e2e, tokens, itls, max(gaps, default=0.0), tpot)


def percentiles_ms(name, values):
    """{name_p50_ms: ..., name_p90_ms: ..., ...}; None where there are no values."""
    values = [v for v in values if not math.isnan(v)]
    return {f"{name}_{key}_ms": round(float(np.percentile(values, q)) * 1e3, 2) if values else None
            for key, q in PERCENTILES.items()}


@dataclass
class Slo:
    ttft_chat_ms: float = 500.0
    ttft_long_ms: float = 3000.0
    itl_p99_ms: float = 50.0      # the p99 of the request's own ITLs

    def describe(self):
        return (f"TTFT <= {self.ttft_chat_ms:g} ms (chat) / {self.ttft_long_ms:g} ms (long), "
                f"and the request's own ITL p99 <= {self.itl_p99_ms:g} ms")

    def met(self, planned, timings):
        ttft_limit = self.ttft_long_ms if planned.kind == "long" else self.ttft_chat_ms
        return (timings is not None and timings.tokens == planned.output_len
                and timings.ttft * 1e3 <= ttft_limit and timings.itl_p99() * 1e3 <= self.itl_p99_ms)


def summarize(run, slo):
    """One rate's row: counts, throughput, percentiles, goodput and the client's CPU share."""
    timed = [(r, request_timings(r)) for r in run.records]
    done = [(r, t) for r, t in timed if t is not None]
    wall = max(run.wall_s, 1e-9)
    output_tokens = sum(t.tokens for _, t in done)
    responses = sum(len(r.responses) for r in run.records)
    met = sum(slo.met(r.planned, t) for r, t in timed)
    row = dict(requests=len(run.records), completed=len(done), failed=len(run.records) - len(done),
               wrong_length=sum(t.tokens != r.planned.output_len for r, t in done),
               input_len_mismatch=sum(r.num_input_tokens != r.planned.input_len for r, _ in done),
               chat_requests=sum(r.planned.kind == "chat" for r in run.records),
               long_requests=sum(r.planned.kind == "long" for r in run.records),
               input_tokens=sum(r.num_input_tokens for r, _ in done), output_tokens=output_tokens,
               responses=responses,
               planned_output_tokens=sum(r.planned.output_len for r in run.records),
               wall_s=round(wall, 3), output_tok_s=round(output_tokens / wall, 1),
               request_s=round(len(done) / wall, 3))
    row.update(percentiles_ms("ttft", [t.ttft for _, t in done]))
    for kind in ("chat", "long"):
        row.update(percentiles_ms(f"ttft_{kind}", [t.ttft for r, t in done if r.planned.kind == kind]))
    row.update(percentiles_ms("itl", [x for _, t in done for x in t.itls]))
    row.update(percentiles_ms("tpot", [t.tpot for _, t in done]))
    row.update(percentiles_ms("stall", [t.stall for _, t in done]))
    row.update(percentiles_ms("e2e", [t.e2e for _, t in done]))
    row.update(slo=slo.describe(), goodput=round(met / max(1, len(run.records)), 4),
               goodput_req_s=round(met / wall, 3),
               client_cpu_s=round(run.client_cpu_s, 3), client_cpu_share=round(run.client_cpu_s / wall, 4),
               client_loop_cpu_share=round(run.loop_cpu_s / wall, 4),
               client_cpu_us_per_response=round(run.client_cpu_s / max(1, responses) * 1e6, 1),
               send_lag_p99_ms=round(float(np.percentile(run.send_lags_s, 99)) * 1e3, 2) if run.send_lags_s else None,
               errors=sorted({r.error for r in run.records if r.error})[:3])
    return row


def request_rows(run):
    """Per-request lines for --requests-out (times in ms from the run's start)."""
    for r in run.records:
        t = request_timings(r)
        yield dict(index=r.planned.index, kind=r.planned.kind, input_len=r.planned.input_len,
                   output_len=r.planned.output_len, num_input_tokens=r.num_input_tokens,
                   arrival_ms=round(r.planned.arrival_s * 1e3, 2), sent_ms=round((r.sent - run.start) * 1e3, 2),
                   tokens=t.tokens if t else 0, ttft_ms=round(t.ttft * 1e3, 2) if t else None,
                   e2e_ms=round(t.e2e * 1e3, 2) if t else None, stall_ms=round(t.stall * 1e3, 2) if t else None,
                   responses=len(r.responses), error=r.error)


# ------------------------------------------------------------------------------------ the server

def launch_server(a, workdir):
    """tritonserver through tools/serve.py: random weights of --shape, or --model-repository as it is."""
    from bench.serving import start_shape_server, wait_ready_or_show_errors
    from tests.e2e.harness import Server

    if a.shape:
        params = dict(kv.split("=", 1) for kv in a.engine_param)
        params.setdefault("max_num_batched_tokens", str(a.max_num_batched_tokens))
        params.setdefault("max_model_len", str(workload_of(a)[1] + 16))
        server = start_shape_server(a.shape, workdir, **params)
    else:
        server = Server(a.model_repository, os.path.join(workdir, "server.log")).start()
    return wait_ready_or_show_errors(server)


# ------------------------------------------------------------------------------------ main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8001", help="gRPC address of a running server")
    ap.add_argument("--openai-url", default="http://127.0.0.1:9000", help="its OpenAI front (--api openai/both)")
    ap.add_argument("--api", choices=["grpc", "openai", "both"], default="grpc",
                    help="send through Triton's gRPC, the OpenAI front, or both in turn (same server, same plan)")
    ap.add_argument("--tokenizer", default="", help="directory with the served model's tokenizer.json")
    ap.add_argument("--rates", type=float, nargs="+", default=[8, 16, 24], help="requests per second")
    ap.add_argument("--workload", choices=sorted(WORKLOADS) + ["fixed"], default="mixed")
    ap.add_argument("--input-len", type=int, nargs=2, default=[512, 512], help="fixed workload: inputs uniform in [A, B]")
    ap.add_argument("--output-len", type=int, default=256, help="fixed workload: output tokens")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[],
                    help="closed loop at these concurrencies instead of --rates (--num-requests each, default 2 x N)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    ap.add_argument("--num-requests", type=int, default=0, help="requests per rate (instead of --duration)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every length (small models, CPU runs)")
    ap.add_argument("--warmup", type=int, default=2, help="requests sent together before the first rate, not measured")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds; a request still open fails")
    ap.add_argument("--label", default="", help="the run's name in the rows and in the plot's legend")
    ap.add_argument("--slo-ttft-ms", type=float, default=Slo.ttft_chat_ms, help="TTFT limit of chat-sized requests")
    ap.add_argument("--slo-ttft-long-ms", type=float, default=Slo.ttft_long_ms, help="TTFT limit of long requests")
    ap.add_argument("--slo-itl-ms", type=float, default=Slo.itl_p99_ms, help="limit of a request's own ITL p99")
    ap.add_argument("--out", default="", help="JSON lines, one per rate")
    ap.add_argument("--requests-out", default="", help="JSON lines, one per request of every rate")
    ap.add_argument("--metrics-out", default="", help="the launched server's vllm: metrics after the last rate")
    launch = ap.add_argument_group("start a server instead of using --url")
    launch.add_argument("--shape", default="", help="random weights of this shape (bench/shapes.py)")
    launch.add_argument("--max-num-batched-tokens", type=int, default=2048)
    launch.add_argument("--engine-param", action="append", default=[], metavar="KEY=VALUE",
                        help="another config.pbtxt parameter of the --shape server")
    launch.add_argument("--launch-server", action="store_true", help="serve --model-repository with tools/serve.py")
    launch.add_argument("--model-repository", default=os.path.join(REPO, "model_repository"))
    a = ap.parse_args(argv)
    if not a.tokenizer and not a.shape:
        ap.error("--tokenizer is needed (the served model's tokenizer directory), except with --shape")
    if not a.label and a.shape:
        a.label = f"{a.shape} budget {a.max_num_batched_tokens}" + "".join(f" {p}" for p in a.engine_param)
    return a


def write_lines(path, rows, mode):
    if path:
        with open(path, mode) as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def run_rates(a, urls, prompts):
    """urls: {api: url}; each level runs through every api in turn: the same arrivals and lengths, each
    api its own prompt words, so that the second does not find the first's prompts in the prefix cache."""
    slo = Slo(a.slo_ttft_ms, a.slo_ttft_long_ms, a.slo_itl_ms)
    lengths = workload_of(a)[0]
    if a.warmup:
        warm = plan_requests(a.workload, 1000.0, prompts, seed=a.seed + 1, num_requests=a.warmup, scale=a.scale,
                             lengths=lengths)
        for api, url in urls.items():
            asyncio.run(run_plan(url, warm, a.request_timeout, api=api))
    rows = []
    levels = [(None, c) for c in a.concurrency] or [(rate, 0) for rate in a.rates]
    for rate, concurrency in levels:
        num_requests = a.num_requests or (min(2 * concurrency, 256) if concurrency else 0)
        for turn, (api, url) in enumerate(urls.items()):
            planned = plan_requests(a.workload, rate or 1e9, prompts, a.seed, a.duration, num_requests, a.scale,
                                    lengths=lengths, text_salt=str(turn) if turn else "")
            run = asyncio.run(run_plan(url, planned, a.request_timeout, concurrency, api))
            row = dict(label=a.label, api=api, workload=a.workload, rate=rate, concurrency=concurrency or None,
                       seed=a.seed, scale=a.scale, duration_s=a.duration if not num_requests else None,
                       **summarize(run, slo))
            print(json.dumps(row), flush=True)
            write_lines(a.out, [row], "a")
            write_lines(a.requests_out, [dict(rate=rate, api=api, **r) for r in request_rows(run)], "a")
            rows.append(row)
    return rows


def save_metrics(url, path):
    """The server's vLLM-named metrics after the run (e.g. the step time and tokens histograms)."""
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as response:
        lines = [l for l in response.read().decode().splitlines() if l.startswith("vllm:")]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    from bench.serving import shape_dir_of
    a = parse_args(argv)
    for path in (a.out, a.requests_out):
        write_lines(path, [], "w")   # a fresh file; rows are appended as each rate ends
    server = None
    if a.shape or a.launch_server:
        server = launch_server(a, tempfile.mkdtemp(prefix="llm-serving-rate-"))
    try:
        grpc_url, openai_url = (server.grpc_url, server.openai_url) if server else (a.url, a.openai_url)
        urls = {"grpc": grpc_url, "openai": openai_url}
        urls = urls if a.api == "both" else {a.api: urls[a.api]}
        prompts = PromptBuilder(a.tokenizer or shape_dir_of(a.shape), seed=a.seed)
        rows = run_rates(a, urls, prompts)
        if server is not None and a.metrics_out:
            save_metrics(f"http://127.0.0.1:{server.metrics_port}/metrics", a.metrics_out)
        return rows
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
