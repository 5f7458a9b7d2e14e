"""The OpenAI API's requests and responses (as vLLM's server speaks them), and vLLM's /generate.

A request becomes a Generation: the prompts and the `llm` model's sampling parameters (same names
as vLLM's SamplingParams, which the engine validates and names in its errors). Responses are
built from the Deltas of the model's gRPC stream (triton_client.py)."""
import time
import uuid
from dataclasses import dataclass, field

# Sampling fields a request may carry, passed to the engine under the same name (OpenAI's, then
# vLLM's extra parameters).
OPENAI_SAMPLING = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
                   "logit_bias")
VLLM_SAMPLING = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                 "skip_special_tokens", "include_stop_str_in_output", "spaces_between_special_tokens",
                 "use_beam_search", "best_of", "length_penalty", "early_stopping", "allowed_token_ids",
                 "bad_words", "truncate_prompt_tokens", "add_special_tokens")
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
               500: "InternalServerError", 503: "ServiceUnavailableError"}
LOGPROB_FLOOR = -9999.0   # -inf is no JSON number: vLLM reports this instead


class RequestError(Exception):
    """A request the front refuses: an OpenAI error with this HTTP status, naming the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"), "param": param,
                      "code": status}}


@dataclass
class Generation:
    prompts: list[str]
    sampling: dict                      # the llm model's sampling_parameters
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False      # every chunk carries the usage so far (vLLM's continuous_usage_stats)
    logprobs: int | None = None         # most likely tokens to report per token (None: no log-probs)
    echo: bool = False
    request_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


# ------------------------------------------------------------------------------------ parsing

def _check_type(body: dict, name: str, types, what: str):
    """body[name] (None when absent or null), refused unless of `types` (a boolean is no integer)."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, bool) if types is bool else isinstance(value, types) and not isinstance(value, bool)
    if not ok:
        raise RequestError(f"'{name}' must be {what}", name)
    return value


def check_model(body: dict, served: list[str]):
    model = body.get("model")
    if model is not None and model not in served:
        raise RequestError(f"The model `{model}` does not exist (served: {', '.join(served)}).", "model", 404)


def _stream_options(body: dict, stream: bool) -> dict:
    """{"include_usage", "continuous_usage"} of stream_options (vLLM's continuous_usage_stats too)."""
    options = _check_type(body, "stream_options", dict, "an object")
    if options is None:
        return {}
    if not stream:
        raise RequestError("'stream_options' can only be set when 'stream' is true", "stream_options")
    return {"include_usage": bool(_check_type(options, "include_usage", bool, "a boolean")),
            "continuous_usage": bool(_check_type(options, "continuous_usage_stats", bool, "a boolean"))}


def _sampling(body: dict, names=OPENAI_SAMPLING + VLLM_SAMPLING) -> dict:
    """The request's sampling fields (nulls dropped: the engine's defaults apply)."""
    return {name: body[name] for name in names if body.get(name) is not None}


def _n(body: dict) -> int:
    n = _check_type(body, "n", int, "an integer")
    return 1 if n is None else n


def parse_completion(body: dict, served: list[str]) -> Generation:
    check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise RequestError("'prompt' as token ids is not supported: send the text", "prompt")
    else:
        raise RequestError("'prompt' is required: a string or a non-empty list of strings", "prompt")
    if body.get("suffix") is not None:
        raise RequestError("'suffix' is not supported", "suffix")
    stream = bool(_check_type(body, "stream", bool, "a boolean"))
    echo = bool(_check_type(body, "echo", bool, "a boolean"))
    logprobs = _check_type(body, "logprobs", int, "an integer")
    if echo and logprobs is not None:
        raise RequestError("'echo' with 'logprobs' is not supported (the prompt's log-probs are not reported)", "echo")
    sampling = _sampling(body)
    sampling["max_tokens"] = body.get("max_tokens", 16)   # OpenAI's default; null: until max_model_len
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    return Generation(prompts, sampling, n=_n(body), stream=stream, logprobs=logprobs, echo=echo,
                      request_id=f"cmpl-{uuid.uuid4().hex}", **_stream_options(body, stream))


def parse_chat(body: dict, served: list[str]) -> tuple[Generation, list[dict], dict]:
    """(the generation without its prompt, the messages, template options); the caller renders."""
    check_model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required: a non-empty list of messages", "messages")
    messages = [_message(m, i) for i, m in enumerate(messages)]
    if body.get("tools") and body.get("tool_choice", "auto") != "none":
        raise RequestError("'tools' are not supported", "tools")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise RequestError("'response_format' other than {\"type\": \"text\"} is not supported", "response_format")
    stream = bool(_check_type(body, "stream", bool, "a boolean"))
    want_logprobs = bool(_check_type(body, "logprobs", bool, "a boolean"))
    top = _check_type(body, "top_logprobs", int, "an integer")
    if top is not None and not want_logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    sampling = _sampling(body)
    sampling.setdefault("add_special_tokens", False)   # the chat template writes them (as vLLM)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling["max_tokens"] = limit   # null: until max_model_len, as vLLM
    logprobs = (top or 0) if want_logprobs else None
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    options = {"add_generation_prompt": _check_type(body, "add_generation_prompt", bool, "a boolean"),
               "continue_final_message": bool(_check_type(body, "continue_final_message", bool, "a boolean")),
               "chat_template_kwargs": _check_type(body, "chat_template_kwargs", dict, "an object") or {}}
    if options["add_generation_prompt"] is None:
        options["add_generation_prompt"] = not options["continue_final_message"]
    if options["add_generation_prompt"] and options["continue_final_message"]:
        raise RequestError("'add_generation_prompt' and 'continue_final_message' cannot both be true",
                           "continue_final_message")
    generation = Generation([], sampling, n=_n(body), stream=stream, logprobs=logprobs,
                            request_id=f"chatcmpl-{uuid.uuid4().hex}", **_stream_options(body, stream))
    return generation, messages, options


def _message(message, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError(f"'{where}' must be an object with a 'role'", "messages")
    content = message.get("content")
    if isinstance(content, list):   # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"'{where}.content': only text parts are supported", "messages")
            texts.append(part["text"])
        content = "".join(texts)
    elif content is not None and not isinstance(content, str):
        raise RequestError(f"'{where}.content' must be a string or a list of text parts", "messages")
    return {**message, "content": content if content is not None else ""}


def parse_generate(body: dict) -> Generation:
    """vLLM's api_server /generate: `prompt`, `stream`, and the sampling parameters as top-level keys."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError("'prompt' is required: a string", "prompt")
    stream = bool(_check_type(body, "stream", bool, "a boolean"))
    sampling = {k: v for k, v in body.items() if k not in ("prompt", "stream")}
    return Generation([prompt], sampling, n=_n(body), stream=stream, request_id=f"generate-{uuid.uuid4().hex}")


# ------------------------------------------------------------------------------------ log-probs

def _entries(token_map: dict) -> list[tuple[str, float, int]]:
    """(decoded token, log-prob, rank) of one token's map; the sampled token comes first."""
    return [(e.get("decoded_token") or "", max(float(e["logprob"]), LOGPROB_FLOOR), int(e.get("rank", 0)))
            for e in token_map.values()]


class CompletionLogprobs:
    """OpenAI's completions `logprobs` object, grown token by token."""

    def __init__(self, text_offset: int = 0):
        self.offset = text_offset

    def convert(self, maps: list[dict]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_map in maps:
            entries = _entries(token_map)
            token, logprob, _ = entries[0]
            out["tokens"].append(token)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append({t: lp for t, lp, _ in entries})
            out["text_offset"].append(self.offset)
            self.offset += len(token)
        return out


def chat_logprobs(maps: list[dict], top: int) -> dict:
    """OpenAI's chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for token_map in maps:
        entries = _entries(token_map)
        token, logprob, _ = entries[0]
        ranked = sorted((e for e in entries if 1 <= e[2] <= top), key=lambda e: e[2])
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                                         for t, lp, _ in ranked]})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
