"""bench/serving_rate.py: prompts of exact token counts, the seeded Poisson plan, the timing definitions,
and a short run against the session's tritonserver (tiny random Llama) in which every request must
finish with exactly its planned output length and the statistics must agree with one another."""
import json
import math
import random

import pytest

from bench import serving_rate as sr

METRICS = ("ttft", "ttft_chat", "itl", "tpot", "stall", "e2e")


@pytest.fixture(scope="module")
def prompts(tiny_model):
    return sr.PromptBuilder(tiny_model, seed=0)


def test_prompts_encode_to_the_wanted_length(prompts):
    rng = random.Random(0)
    for n in (prompts.added_tokens + 1, 3, 17, 256, 2000):
        text = prompts.build(n, rng)
        assert prompts.count(text) == n
    assert prompts.build(64, random.Random(1)) != prompts.build(64, random.Random(2))   # no shared prefix


def test_plan_is_seeded_poisson_and_scaled(prompts):
    plan = sr.plan_requests("mixed", 4.0, prompts, seed=3, duration_s=30, scale=0.05)
    again = sr.plan_requests("mixed", 4.0, prompts, seed=3, duration_s=30, scale=0.05)
    assert [(p.arrival_s, p.input_len, p.output_len, p.prompt) for p in plan] == \
           [(p.arrival_s, p.input_len, p.output_len, p.prompt) for p in again]
    assert all(0 < p.arrival_s <= 30 for p in plan) and 60 < len(plan) < 180   # ~120 expected
    assert all(a.arrival_s < b.arrival_s for a, b in zip(plan, plan[1:]))
    chat = [p for p in plan if p.kind == "chat"]
    long = [p for p in plan if p.kind == "long"]
    assert chat and long
    assert all(3 <= p.input_len <= 26 and 2 <= p.output_len <= 19 for p in chat)     # U[64,512] x 0.05 ...
    assert all(102 <= p.input_len <= 300 and 2 <= p.output_len <= 3 for p in long)   # U[2048,6000] x 0.05 ...
    arrivals = sr.poisson_arrivals(random.Random(0), 8.0, num_requests=4000)
    assert len(arrivals) == 4000 and arrivals[-1] / 4000 == pytest.approx(1 / 8, rel=0.08)   # mean gap 1/rate


def test_a_text_salt_changes_only_the_words(prompts):
    """--api both sends the second api prompts of the same lengths at the same times, none of them a prompt
    the first api sent (the prefix cache would skip their prefill)."""
    plan = sr.plan_requests("mixed", 4.0, prompts, seed=3, duration_s=10, scale=0.05)
    salted = sr.plan_requests("mixed", 4.0, prompts, seed=3, duration_s=10, scale=0.05, text_salt="1")
    assert [(p.arrival_s, p.kind, p.input_len, p.output_len) for p in plan] == \
           [(p.arrival_s, p.kind, p.input_len, p.output_len) for p in salted]
    assert all(prompts.count(p.prompt) == p.input_len for p in salted)
    assert not {p.prompt for p in plan} & {p.prompt for p in salted}


def test_timings_follow_the_definitions():
    planned = sr.PlannedRequest(0, "chat", 5, 4, 0.0, "")
    # times in exact binary fractions, so that the SLO's bounds can be tested at equality
    record = sr.RequestRecord(planned, sent=0.0, responses=[(0.125, 1), (0.1875, 1), (0.3125, 2)])
    t = sr.request_timings(record)
    assert (t.ttft, t.e2e, t.tokens) == (0.125, 0.3125, 4)
    assert t.itls == [0.0625, 0.0625, 0.0625]    # the 125 ms gap carried two tokens
    assert t.stall == 0.125 and t.tpot == (0.3125 - 0.125) / 3
    assert sr.request_timings(sr.RequestRecord(planned, error="refused")) is None
    assert sr.Slo(ttft_chat_ms=125, ttft_long_ms=0, itl_p99_ms=62.5).met(planned, t)
    assert not sr.Slo(ttft_chat_ms=124, itl_p99_ms=62.5).met(planned, t)
    assert not sr.Slo(ttft_chat_ms=125, itl_p99_ms=62).met(planned, t)
    longer = sr.PlannedRequest(0, "chat", 5, 5, 0.0, "")
    assert not sr.Slo(ttft_chat_ms=125, itl_p99_ms=62.5).met(longer, t)   # one token short


def test_a_short_rate_against_the_server(server, tiny_model, tmp_path):
    out, per_request = tmp_path / "rate.jsonl", tmp_path / "requests.jsonl"
    rows = sr.main(["--url", server.grpc_url, "--tokenizer", tiny_model, "--rates", "4", "--duration", "3",
                    "--scale", "0.1", "--seed", "1", "--warmup", "1", "--label", "test",
                    "--out", str(out), "--requests-out", str(per_request)])
    assert len(rows) == 1
    row = rows[0]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert (row["label"], row["workload"], row["rate"]) == ("test", "mixed", 4.0)

    # every request finished with exactly its output length, and its prompt had the planned length
    assert row["requests"] >= 3 and row["completed"] == row["requests"], row["errors"]
    assert row["failed"] == row["wrong_length"] == row["input_len_mismatch"] == 0
    requests = [json.loads(line) for line in per_request.read_text().splitlines()]
    assert len(requests) == row["requests"]
    for r in requests:
        assert r["error"] == "" and r["tokens"] == r["output_len"] and r["num_input_tokens"] == r["input_len"]
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert r["stall_ms"] <= r["e2e_ms"] - r["ttft_ms"] + 0.02   # each rounded to 0.01 ms
        assert r["sent_ms"] >= r["arrival_ms"] - 1e-6
    assert row["output_tokens"] == row["planned_output_tokens"] == sum(r["tokens"] for r in requests)
    assert row["input_tokens"] == sum(r["input_len"] for r in requests)
    assert row["chat_requests"] + row["long_requests"] == row["requests"]
    assert row["responses"] == sum(r["responses"] for r in requests) >= row["requests"]
    metrics = tmp_path / "metrics.txt"   # what --metrics-out keeps: the step histograms among them
    sr.save_metrics(f"http://127.0.0.1:{server.metrics_port}/metrics", metrics)
    steps = [l for l in metrics.read_text().splitlines() if l.startswith("vllm:step_duration_seconds_count{")]
    assert steps and float(steps[0].rsplit(" ", 1)[1]) >= row["output_tokens"] / row["requests"]

    # the statistics agree with one another
    for metric in METRICS:
        qs = [row[f"{metric}_{p}_ms"] for p in ("p50", "p90", "p99", "p999")]
        assert all(q is not None and q >= 0 for q in qs), metric
        assert qs == sorted(qs), metric
    for metric in ("ttft", "e2e", "stall"):
        assert row[f"{metric}_p999_ms"] <= max(r[f"{metric}_ms"] for r in requests) + 0.01, metric
    assert row["output_tok_s"] == pytest.approx(row["output_tokens"] / row["wall_s"], rel=0.01)
    assert 0 <= row["goodput"] <= 1 and row["goodput_req_s"] <= row["request_s"] + 1e-9
    assert 0 < row["client_loop_cpu_share"] <= row["client_cpu_share"] and math.isfinite(row["client_cpu_share"])


def test_the_same_plan_through_grpc_and_the_openai_front(server, tiny_model, tmp_path):
    """--api both: the same requests through gRPC and through the OpenAI front (closed loop), each
    request with exactly its tokens, counted from the front's per-chunk usage as on gRPC."""
    per_request = tmp_path / "requests.jsonl"
    rows = sr.main(["--url", server.grpc_url, "--openai-url", server.openai_url, "--api", "both",
                    "--tokenizer", tiny_model, "--concurrency", "4", "--num-requests", "8", "--workload", "fixed",
                    "--input-len", "8", "24", "--output-len", "12", "--warmup", "1", "--requests-out", str(per_request)])
    assert [r["api"] for r in rows] == ["grpc", "openai"]
    for row in rows:
        assert row["completed"] == row["requests"] == 8 and row["wrong_length"] == row["input_len_mismatch"] == 0
        assert row["output_tokens"] == 8 * 12 and row["responses"] >= 8
    requests = [json.loads(line) for line in per_request.read_text().splitlines()]
    by_api = {api: [r for r in requests if r["api"] == api] for api in ("grpc", "openai")}
    assert [r["num_input_tokens"] for r in by_api["grpc"]] == [r["num_input_tokens"] for r in by_api["openai"]]
