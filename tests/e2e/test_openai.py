"""The OpenAI-compatible front and vLLM's /generate against a real tritonserver, driven by the
official `openai` client (sync and async) and by curl. References: the llm model's own answers
through Triton's generate endpoint, and transformers' apply_chat_template for chat prompts."""
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest
import requests

from tests.checkpoints import CHAT_TEMPLATE

from .harness import MODEL_NAME, REPO, free_port
from .test_server import generate, greedy

PROMPT = "ROMEO:"
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.openai_url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(tiny_model)


def triton_text(server, prompt, max_tokens, **extra):
    r = generate(server, greedy(prompt, max_tokens=max_tokens, **extra))
    assert r.status_code == 200, r.text
    return r.json()["text_output"]


def rendered(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)


def test_health_models_and_metrics(server, client):
    assert requests.get(f"{server.openai_url}/health", timeout=10).status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME] and models[0].max_model_len == 4096   # vLLM's field
    metrics = requests.get(f"{server.openai_url}/metrics", timeout=10)   # where vLLM's server has them
    assert metrics.status_code == 200 and "vllm:num_requests_running{" in metrics.text


def test_completion_is_the_models_answer(server, client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.text == triton_text(server, PROMPT, 12) and choice.finish_reason == "length"
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_completion_stream_with_usage(server, client):
    whole = triton_text(server, PROMPT, 20)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole and len(texts) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    counted = [c.usage.completion_tokens for c in client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})]   # vLLM's: usage in every chunk
    assert counted == sorted(counted) and counted[-1] == 20 and len(set(counted)) > 1


def test_n_and_batched_prompts(server, client):
    prompts = [PROMPT, "JULIET:"]
    out = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    expected = [triton_text(server, p, 6) for p in prompts]
    assert [c.text for c in out.choices] == [expected[0]] * 2 + [expected[1]] * 2
    assert out.usage.completion_tokens == 24
    seeded = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=7)
    again = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=7)
    assert [c.text for c in seeded.choices] == [c.text for c in again.choices]


def test_stop_and_echo(server, client):
    whole = triton_text(server, PROMPT, 30)
    stop = whole[5:8]
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert out.choices[0].text == whole[:whole.index(stop)] and out.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + triton_text(server, PROMPT, 5)


def test_completion_logprobs_are_the_models(server, client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    r = generate(server, {**greedy(PROMPT, max_tokens=6, logprobs=2), "return_logprobs": True})
    maps = json.loads(r.json()["logprobs"])
    assert lp.token_logprobs == pytest.approx([next(iter(m.values()))["logprob"] for m in maps])
    assert len(lp.tokens) == 6 and all(isinstance(t, str) and t for t in lp.tokens)
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_uses_the_tokenizers_template(server, client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who goes there?"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    # tokenized as vLLM's chat API does: without the tokenizer's own special tokens (the template's only)
    assert out.choices[0].message.content == triton_text(server, rendered(tokenizer, messages), 10,
                                                         add_special_tokens=False)
    assert out.usage.prompt_tokens == len(tokenizer(rendered(tokenizer, messages), add_special_tokens=False)["input_ids"])


def test_chat_stream_and_logprobs(server, client, tokenizer):
    messages = [{"role": "user", "content": "Speak."}]
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=12,
                                                 temperature=0, stream=True, logprobs=True, top_logprobs=2))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == triton_text(server, rendered(tokenizer, messages), 12, add_special_tokens=False)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    r = generate(server, {**greedy(rendered(tokenizer, messages), max_tokens=12, logprobs=2, add_special_tokens=False),
                          "return_logprobs": True})
    maps = json.loads(r.json()["logprobs"])
    assert [t.logprob for t in tokens] == pytest.approx([next(iter(m.values()))["logprob"] for m in maps])
    # (a token's own text may be half a character, "\ufffd", as in vLLM: the texts need not join up)
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob for t in tokens)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_async_client_concurrent_streams(server):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.openai_url}/v1", api_key="unused", timeout=TIMEOUT_S,
                                      max_retries=0) as aclient:
            async def one(i):
                stream = await aclient.completions.create(model=MODEL_NAME, prompt=f"{PROMPT} {i}", max_tokens=8,
                                                          temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream if c.choices])
            return await asyncio.gather(*(one(i) for i in range(6)))
    texts = asyncio.run(main())
    assert texts == [triton_text(server, f"{PROMPT} {i}", 8) for i in range(6)]


def test_cancelled_stream_cancels_the_request(server, client):
    before = server.log().count("cancelled by the client")
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while server.log().count("cancelled by the client") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count("cancelled by the client") == before + 1


def test_bad_requests_get_openai_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=-1)
    assert e.value.status_code == 400 and "'temperature'" in e.value.message
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "BadRequestError"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "robot", "content": "x"}])
    raw = requests.post(f"{server.openai_url}/v1/completions", data=b"{not json", timeout=10)
    assert raw.status_code == 400 and raw.json()["error"]["code"] == 400
    missing = requests.get(f"{server.openai_url}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    # a streaming request refused before any output gets its status, not a stream
    bad_stream = requests.post(f"{server.openai_url}/v1/completions", json={"prompt": PROMPT, "stream": True,
                                                                             "top_p": 2.0}, timeout=10)
    assert bad_stream.status_code == 400 and bad_stream.json()["error"]["param"] == "top_p"


def test_tokenize_and_detokenize_agree_with_the_engine(server, client, tokenizer):
    """vLLM's /tokenize and /detokenize: the counts are the engine's own (usage), ids round-trip."""
    url = server.openai_url
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT + " hello", max_tokens=1, temperature=0)
    counted = requests.post(f"{url}/tokenize", json={"model": MODEL_NAME, "prompt": PROMPT + " hello"}, timeout=10).json()
    assert counted["count"] == len(counted["tokens"]) == out.usage.prompt_tokens and counted["max_model_len"] == 4096
    messages = [{"role": "user", "content": "Who goes there?"}]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1, temperature=0)
    counted = requests.post(f"{url}/tokenize", json={"messages": messages}, timeout=10).json()
    assert counted["count"] == chat.usage.prompt_tokens
    assert counted["tokens"] == tokenizer(rendered(tokenizer, messages), add_special_tokens=False)["input_ids"]
    plain = requests.post(f"{url}/tokenize", json={"prompt": "Héllo 🙂", "add_special_tokens": False}, timeout=10)
    back = requests.post(f"{url}/detokenize", json={"tokens": plain.json()["tokens"]}, timeout=10)
    assert back.json() == {"prompt": "Héllo 🙂"}
    refused = requests.post(f"{url}/tokenize", json={"messages": [{"role": "robot", "content": "x"}]}, timeout=10)
    assert refused.status_code == 400 and "unknown role" in refused.json()["error"]["message"]
    bad = requests.post(f"{url}/detokenize", json={"tokens": [10 ** 9]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def curl(*args):
    return subprocess.run(["curl", "-sS", "--max-time", str(TIMEOUT_S), *args], capture_output=True, text=True,
                          check=True).stdout


def test_vllm_generate_route_with_curl(server):
    """The request this project started from, as a vLLM user types it (on the front's port)."""
    body = {"prompt": "The capital of France is", "n": 1, "use_beam_search": False, "temperature": 0.7,
            "max_tokens": 10}
    out = json.loads(curl(f"{server.openai_url}/generate", "-d", json.dumps(body)))
    assert len(out["text"]) == 1 and out["text"][0].startswith("The capital of France is")
    greedy_body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 9}
    whole = json.loads(curl(f"{server.openai_url}/generate", "-d", json.dumps(greedy_body)))["text"]
    assert whole == [PROMPT + triton_text(server, PROMPT, 9)]
    lines = curl("-N", f"{server.openai_url}/generate", "-d", json.dumps({**greedy_body, "stream": True})).splitlines()
    texts = [json.loads(line)["text"] for line in lines if line]
    assert len(texts) > 1 and texts[-1] == whole
    assert all(len(a[0]) <= len(b[0]) and b[0].startswith(a[0]) for a, b in zip(texts, texts[1:]))


def test_openai_completions_with_curl_stream(server):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    events = [line[len("data: "):] for line in curl("-N", f"{server.openai_url}/v1/completions",
                                                    "-H", "Content-Type: application/json",
                                                    "-d", json.dumps(body)).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == triton_text(server, PROMPT, 5)


def test_front_survives_a_client_that_sends_half_a_request(server, client):
    with socket.create_connection(("127.0.0.1", server.openai_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    assert out.choices[0].text == triton_text(server, PROMPT, 3)


def test_client_gone_before_a_single_response_cancels_the_request(server):
    """A non-streaming request whose client goes away is cancelled too (the handler is cancelled)."""
    before = server.log().count("cancelled by the client")
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.openai_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while server.log().count("cancelled by the client") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count("cancelled by the client") == before + 1


def test_a_killed_front_is_restarted_by_the_launcher(server, client):
    pids = subprocess.run(["pgrep", "-f", f"entrypoints.api_server .*--port {server.openai_port} "],
                          capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    subprocess.run(["kill", "-9", pids[0]], check=True)
    deadline, status = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        try:
            status = requests.get(f"{server.openai_url}/health", timeout=2).status_code
            if status == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.2)
    assert status == 200 and "the OpenAI front exited with -9: restarting it" in server.log()
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    assert out.choices[0].text == triton_text(server, PROMPT, 3)


@contextlib.contextmanager
def front_process(server, *args, env=None):
    """Another OpenAI front (entrypoints.api_server) on a free port beside the session server's;
    yields (its Popen, its URL) once /health answers; killed at the end."""
    port = free_port()
    front = subprocess.Popen([sys.executable, "-m", "entrypoints.api_server", "--port", str(port),
                              "--triton-url", server.grpc_url, "--model-repository", str(server.model_repository),
                              *args], cwd=REPO, env=dict(os.environ, **(env or {})),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        yield front, url
    finally:
        front.send_signal(signal.SIGKILL)
        front.wait()


def alive(pid):
    return os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"


def test_workers_share_the_port_and_end_with_their_front(server):
    """--workers 2: both processes answer on one port; a front killed outright takes its workers along."""
    with front_process(server, "--workers", "2") as (front, url):
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(front.pid), "-f", "spawn_main"],
                                                  capture_output=True, text=True).stdout.split()]
        assert len(workers) == 2, workers
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as c:
            texts = {c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0,
                                          extra_headers={"Connection": "close"}).choices[0].text for _ in range(6)}
        assert texts == {triton_text(server, PROMPT, 3)}
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers), "workers outlived their front"


def test_api_key_and_served_model_names(server):
    """vLLM's VLLM_API_KEY: every route but /health needs the bearer key; --served-model-name sets
    the names a client may ask for."""
    with front_process(server, "--served-model-name", "shakespeare", "llm", env={"VLLM_API_KEY": "k" * 20}) as (_, url):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
        assert requests.post(f"{url}/generate", json={"prompt": "x"}, timeout=10).status_code == 401
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 404   # open, but no --metrics-url here
        with openai.OpenAI(base_url=f"{url}/v1", api_key="k" * 20, max_retries=0) as c:
            assert [m.id for m in c.models.list().data] == ["shakespeare", "llm"]
            out = c.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=3, temperature=0)
            assert out.model == "shakespeare" and out.choices[0].text == triton_text(server, PROMPT, 3)
