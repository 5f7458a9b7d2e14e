"""The OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), /health and vLLM's /generate
in front of a tritonserver, each request sent to the `llm` model's gRPC stream (aiohttp).

    python -m entrypoints.api_server --port 9000 --triton-url 127.0.0.1:8001 --model-repository model_repository

tools/serve.py starts it beside tritonserver. Streams are server-sent events ending with
`data: [DONE]`; a client that goes away cancels its request in the engine (the handler is
cancelled, which cancels the gRPC call)."""
import argparse
import asyncio
import ctypes
import hmac
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import time
from contextlib import aclosing

from aiohttp import web

from backend.tokenizer import load_tokenizer
from entrypoints import chat_template
from entrypoints.protocol import (CompletionLogprobs, Generation, RequestError, chat_logprobs, check_model,
                                  error_body, parse_chat, parse_completion, parse_generate, usage)
from entrypoints.triton_client import GenerationError, TritonLLM

log = logging.getLogger("entrypoints.api_server")
MAX_BODY_BYTES = 64 << 20   # the engine refuses prompts too long for the model with a clear error
OWNER = "triton-llm-backend"
PR_SET_PDEATHSIG = 1


def error_response(message: str, status: int, param: str | None = None) -> web.Response:
    return web.json_response(error_body(message, status, param), status=status)


def generation_error(e: GenerationError) -> tuple[str, int, str | None]:
    """(message, status, param): the engine names the field it refuses first, in quotes."""
    named = re.match(r"'(\w+)'", e.message)
    return e.message, 503 if e.unavailable else 400, named.group(1) if named else None


async def read_body(request: web.Request) -> dict:
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError):
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


class EventStream:
    """Server-sent events; the HTTP response starts with the first event, so that an error before
    any output still gets its own status."""

    def __init__(self, request: web.Request, content_type: str = "text/event-stream", sse: bool = True):
        self.request, self.content_type, self.sse = request, content_type, sse
        self.response: web.StreamResponse | None = None

    async def send(self, payload):
        if self.response is None:
            self.response = web.StreamResponse(headers={"Content-Type": self.content_type,
                                                        "Cache-Control": "no-cache"})
            await self.response.prepare(self.request)
        data = payload if isinstance(payload, str) else json.dumps(payload)
        await self.response.write(f"data: {data}\n\n".encode() if self.sse else (data + "\n").encode())

    async def finish(self) -> web.StreamResponse:
        await self.response.write_eof()
        return self.response


class Choices:
    """Per choice (prompt i, sample j -> index i * n + j): text, finish reason, log-prob maps, tokens."""

    def __init__(self, num_prompts: int, n: int):
        self.n = n
        count = num_prompts * n
        self.texts = [[] for _ in range(count)]
        self.reasons: list[str | None] = [None] * count
        self.maps: list[list] = [[] for _ in range(count)]
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens = 0

    def updates(self, prompt_index: int, delta):
        """(choice index, new text, new log-prob maps, finish reason if it just finished) of a Delta."""
        self.prompt_tokens[prompt_index] = delta.num_input_tokens or self.prompt_tokens.get(prompt_index, 0)
        self.completion_tokens += sum(delta.num_output_tokens)
        for j, text in enumerate(delta.texts):
            index = prompt_index * self.n + j
            if self.reasons[index] is not None:
                continue   # finished already
            reason = delta.finish_reasons[j] if j < len(delta.finish_reasons) else None
            maps = (delta.logprobs[j] or []) if delta.logprobs else []
            if not text and not maps and reason is None:
                continue
            self.texts[index].append(text)
            self.maps[index].extend(maps)
            self.reasons[index] = reason
            yield index, text, maps, reason

    def usage(self) -> dict:
        return usage(sum(self.prompt_tokens.values()), self.completion_tokens)


class ModelFiles:
    """What the front reads of the served model's folder: chat template, tokenizer, max_model_len."""

    def __init__(self, config: dict, model_dir: str, template_override: str | None):
        self.folder = chat_template.model_tokenizer_dir(config, model_dir)
        self.template, self.template_error = None, ""
        try:
            self.template = chat_template.load(self.folder, template_override)
        except (chat_template.ChatTemplateError, OSError) as e:
            self.template_error = str(e)
        self.max_model_len = chat_template.model_max_len(config, self.folder)
        self._tokenizer = None

    def tokenizer(self):
        if self.folder is None:
            raise RequestError("the model's tokenizer is not found from this front", status=500)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer


class OpenAIServer:
    def __init__(self, llm: TritonLLM, served_names: list[str], model_dir: str = "",
                 chat_template_override: str | None = None, api_key: str | None = None, metrics_url: str = ""):
        self.llm, self.served, self.api_key, self.metrics_url = llm, served_names, api_key, metrics_url
        self.model_dir, self.chat_template_override = model_dir, chat_template_override
        self._files = None
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[json_errors, self.authorize])
        app.add_routes([web.get("/health", self.health), web.get("/v1/models", self.models),
                        web.get("/metrics", self.metrics),
                        web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions),
                        web.post("/generate", self.generate), web.post("/tokenize", self.tokenize),
                        web.post("/detokenize", self.detokenize)])
        app.on_cleanup.append(lambda _: self.llm.close())
        return app

    @web.middleware
    async def authorize(self, request, handler):
        """With an API key (vLLM's --api-key / VLLM_API_KEY), every route but /health and /metrics
        (open, as in vLLM's server) needs `Authorization: Bearer <key>`."""
        if self.api_key and request.path not in ("/health", "/metrics") and \
                not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {self.api_key}"):
            return error_response("Unauthorized: a valid API key is needed (Authorization: Bearer ...)", 401)
        return await handler(request)

    # ---- simple routes ---------------------------------------------------------------------------
    async def health(self, request):
        ready = await self.llm.is_ready()
        return web.Response(status=200 if ready else 503, text="" if ready else "the model is not ready")

    async def metrics(self, request):
        """tritonserver's Prometheus metrics (the vllm: ones among them) on this port too, where a
        scraper set up for vLLM's server looks for them."""
        if not self.metrics_url:
            raise web.HTTPNotFound(reason="no metrics endpoint given (--metrics-url)")
        import aiohttp
        try:
            async with aiohttp.ClientSession() as session, session.get(self.metrics_url, timeout=aiohttp.ClientTimeout(
                    total=10)) as upstream:
                return web.Response(body=await upstream.read(), status=upstream.status,
                                    content_type="text/plain", charset="utf-8")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return error_response(f"the server's metrics are not reachable: {e}", 503)

    async def models(self, request):
        try:
            max_model_len = (await self._model_files()).max_model_len
        except RequestError:   # the server is not up yet
            max_model_len = None
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": OWNER, "root": self.served[0],
             "parent": None, "max_model_len": max_model_len} for name in self.served]})

    # ---- generation ------------------------------------------------------------------------------
    async def _deltas(self, g: Generation):
        """(prompt index, Delta) of every prompt's stream, as they come."""
        want_logprobs = g.logprobs is not None
        if len(g.prompts) == 1:
            async with aclosing(self.llm.generate(g.prompts[0], g.sampling, g.stream, want_logprobs)) as deltas:
                async for delta in deltas:
                    yield 0, delta
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, prompt):
            try:
                async with aclosing(self.llm.generate(prompt, g.sampling, g.stream, want_logprobs)) as deltas:
                    async for delta in deltas:
                        queue.put_nowait((i, delta, None))
                queue.put_nowait((i, None, None))
            except GenerationError as e:
                queue.put_nowait((i, None, e))
        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(g.prompts)]
        try:
            live = len(tasks)
            while live:
                i, delta, error = await queue.get()
                if error is not None:
                    raise error
                if delta is None:
                    live -= 1
                else:
                    yield i, delta
        finally:
            for task in tasks:
                task.cancel()

    async def _serve(self, request, g: Generation, chunk_object: str, choice, final, extra_chunks=()):
        """Run g: stream its chunks (choice(index, text, maps, reason) -> chunk choice) or answer
        once (final(choices) -> body)."""
        choices = Choices(len(g.prompts), g.n)
        stream = EventStream(request) if g.stream else None
        try:
            async with aclosing(self._deltas(g)) as deltas:
                async for i, delta in deltas:
                    for index, text, maps, reason in choices.updates(i, delta):
                        if stream is not None:
                            if stream.response is None:
                                for chunk in extra_chunks:
                                    await stream.send(chunk)
                            chunk = choice(index, text, maps, reason)
                            if g.continuous_usage:
                                chunk["usage"] = choices.usage()
                            await stream.send(chunk)
        except GenerationError as e:
            if stream is None or stream.response is None:
                return error_response(*generation_error(e))
            await stream.send(error_body(*generation_error(e)))
            await stream.send("[DONE]")
            return await stream.finish()
        if stream is None:
            return web.json_response(final(choices))
        if g.include_usage:
            await stream.send(self._body(g, chunk_object, [], usage=choices.usage()))
        await stream.send("[DONE]")
        return await stream.finish()

    def _body(self, g: Generation, obj: str, choices: list, **extra) -> dict:
        return {"id": g.request_id, "object": obj, "created": g.created, "model": self.served[0],
                "choices": choices, **extra}

    async def completions(self, request):
        g = parse_completion(await read_body(request), self.served)
        offsets = [CompletionLogprobs() for _ in range(len(g.prompts) * g.n)]
        echoed = [False] * len(offsets)

        def logprobs(index, maps):
            return offsets[index].convert(maps) if g.logprobs is not None else None

        def choice(index, text, maps, reason):
            if g.echo and not echoed[index]:
                text, echoed[index] = g.prompts[index // g.n] + text, True
            return self._body(g, "text_completion", [{"index": index, "text": text,
                                                      "logprobs": logprobs(index, maps), "finish_reason": reason}])

        def final(choices):
            body = []
            for index, pieces in enumerate(choices.texts):
                prefix = g.prompts[index // g.n] if g.echo else ""
                body.append({"index": index, "text": prefix + "".join(pieces),
                             "logprobs": logprobs(index, choices.maps[index]), "finish_reason": choices.reasons[index]})
            return self._body(g, "text_completion", body, usage=choices.usage())
        return await self._serve(request, g, "text_completion", choice, final)

    async def chat_completions(self, request):
        g, messages, options = parse_chat(await read_body(request), self.served)
        g.prompts = [await self._render_chat(messages, options)]

        def logprobs(maps):
            return chat_logprobs(maps, g.logprobs) if g.logprobs is not None else None

        def choice(index, text, maps, reason):
            delta = {"content": text} if text or reason is None else {}
            return self._body(g, "chat.completion.chunk", [{"index": index, "delta": delta,
                                                            "logprobs": logprobs(maps), "finish_reason": reason}])

        def final(choices):
            body = [{"index": index, "message": {"role": "assistant", "content": "".join(pieces)},
                     "logprobs": logprobs(choices.maps[index]), "finish_reason": choices.reasons[index]}
                    for index, pieces in enumerate(choices.texts)]
            return self._body(g, "chat.completion", body, usage=choices.usage())
        roles = [self._body(g, "chat.completion.chunk", [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}])
                 for i in range(g.n)]
        return await self._serve(request, g, "chat.completion.chunk", choice, final, extra_chunks=roles)

    async def _model_files(self) -> "ModelFiles":
        """The served model's tokenizer and chat template, found through its configuration (once)."""
        if self._files is None:
            try:
                config = await self.llm.model_config()
            except Exception as e:  # noqa: BLE001 -- the server is not up yet
                raise RequestError(f"the model is not ready: {e}", status=503) from None
            self._files = ModelFiles(config, os.path.join(self.model_dir, self.llm.model_name),
                                     self.chat_template_override)
        return self._files

    async def _template(self) -> chat_template.ChatTemplate:
        files = await self._model_files()
        if files.template_error:
            raise RequestError(files.template_error, status=500)
        if files.template is None:
            raise RequestError("the model has no chat template (its tokenizer_config.json has no "
                               "'chat_template'): start the front with --chat-template FILE", "messages")
        return files.template

    async def _render_chat(self, messages: list[dict], options: dict) -> str:
        template = await self._template()
        try:
            return template.render(messages, options["add_generation_prompt"], options["continue_final_message"],
                                   **options["chat_template_kwargs"])
        except chat_template.ChatTemplateError as e:
            raise RequestError(str(e), "messages") from None

    async def tokenize(self, request):
        """vLLM's /tokenize: {"prompt"} or {"messages"} -> {"tokens", "count", "max_model_len"}."""
        body = await read_body(request)
        check_model(body, self.served)
        files = await self._model_files()
        if "messages" in body:
            _, messages, options = parse_chat({**body, "stream": False}, self.served)
            text = await self._render_chat(messages, options)
            default_special = False   # the template writes its own special tokens
        elif isinstance(body.get("prompt"), str):
            text, default_special = body["prompt"], True
        else:
            raise RequestError("'prompt' (a string) or 'messages' is required", "prompt")
        add_special = body.get("add_special_tokens", default_special)
        if not isinstance(add_special, bool):
            raise RequestError("'add_special_tokens' must be a boolean", "add_special_tokens")
        tokens = files.tokenizer().encode(text, add_special_tokens=add_special)
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": files.max_model_len})

    async def detokenize(self, request):
        """vLLM's /detokenize: {"tokens"} -> {"prompt"}."""
        body = await read_body(request)
        check_model(body, self.served)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise RequestError("'tokens' must be a list of token ids", "tokens")
        tokenizer = (await self._model_files()).tokenizer()
        if any(not 0 <= t < len(tokenizer) for t in tokens):
            raise RequestError(f"'tokens' must be token ids in [0, {len(tokenizer)})", "tokens")
        return web.json_response({"prompt": tokenizer.decode(tokens, skip_special_tokens=False)})

    async def generate(self, request):
        """vLLM's /generate: {"text": [prompt + completion, ...]}; streamed as one such JSON object
        per line, each with the texts so far."""
        g = parse_generate(await read_body(request))
        prompt = g.prompts[0]

        def texts(choices):
            return {"text": [prompt + "".join(pieces) for pieces in choices.texts]}
        if not g.stream:
            return await self._serve(request, g, "", None, texts)
        choices = Choices(1, g.n)
        stream = EventStream(request, "application/x-ndjson", sse=False)
        try:
            async with aclosing(self._deltas(g)) as deltas:
                async for i, delta in deltas:
                    if list(choices.updates(i, delta)):
                        await stream.send(texts(choices))
        except GenerationError as e:
            if stream.response is None:
                return error_response(*generation_error(e))
            await stream.send(error_body(*generation_error(e)))
        return await stream.finish()


@web.middleware
async def json_errors(request, handler):
    """Every error in OpenAI's shape: the front's own refusals and aiohttp's (404, 405, 413)."""
    try:
        return await handler(request)
    except RequestError as e:
        return error_response(e.message, e.status, e.param)
    except ConnectionResetError:   # the client went away mid-stream: its request is cancelled already
        return web.Response(status=499)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.reason if e.status != 413 else f"the request body exceeds {MAX_BODY_BYTES} bytes",
                              e.status)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="tritonserver's gRPC address")
    p.add_argument("--metrics-url", default="", help="tritonserver's metrics (e.g. http://127.0.0.1:8002/metrics), "
                                                      "served again at /metrics")
    p.add_argument("--model", default="llm", help="the Triton model to serve")
    p.add_argument("--served-model-name", nargs="*", default=[],
                   help="names clients may give as 'model' (default: the Triton model's name)")
    p.add_argument("--model-repository", default="model_repository",
                   help="where the model's folder is (to find its tokenizer's chat template)")
    p.add_argument("--chat-template", default=None, help="a jinja chat template (file or text) instead of the model's")
    p.add_argument("--workers", type=int, default=1, help="processes serving the port (SO_REUSEPORT)")
    p.add_argument("--api-key", default=None,
                   help="clients must send 'Authorization: Bearer <key>' (default: $VLLM_API_KEY; unset: open)")
    return p.parse_args(argv)


def serve(args):
    """One process serving the port (with --workers > 1, one of several sharing it: SO_REUSEPORT)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    llm = TritonLLM(args.triton_url, args.model)
    server = OpenAIServer(llm, args.served_model_name or [args.model], os.path.abspath(args.model_repository),
                          args.chat_template, args.api_key or os.environ.get("VLLM_API_KEY"), args.metrics_url)
    web.run_app(server.app(), host=args.host, port=args.port, handler_cancellation=True, access_log=None,
                reuse_port=args.workers > 1, print=lambda message: log.info("%s", message))


def _worker(args):
    if sys.platform == "linux":   # a worker never outlives the front that started it
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    serve(args)


def serve_workers(args) -> int:
    """--workers processes on one port (the kernel spreads connections among them): one asyncio
    loop streams a few thousand chunks/s (each a gRPC message in and an HTTP write out), fewer than
    a busy GPU makes. If one dies, all stop (exit 1), and the launcher starts the front again."""
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(args,), name=f"api-server-{i}") for i in range(args.workers)]
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        for w in workers:
            if w.is_alive():
                w.terminate()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    for w in workers:
        w.start()
    multiprocessing.connection.wait([w.sentinel for w in workers])
    if not stopping:
        log.error("an API server worker exited: stopping the others")
        on_signal(None, None)
    for w in workers:
        w.join(10)
        if w.is_alive():
            w.kill()
    return 0 if stopping else 1


def main(argv=None):
    args = parse_args(argv)
    if args.workers > 1:
        sys.exit(serve_workers(args))
    serve(args)


if __name__ == "__main__":
    main()
