"""One generation on the `llm` model's gRPC stream: the request's tensors in, one Delta per response out.

A stream per request (gRPC multiplexes them on one connection). Leaving the iteration early (the
HTTP client went away, the handler was cancelled) cancels the gRPC call, and Triton then cancels
the request in the engine."""
import json
import uuid
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

# Phrases of the engine's errors for requests it cannot take now (backend/engine.py), and Triton's
# for a model that is not loaded: over a gRPC stream an error carries only its message (Triton 2.51).
UNAVAILABLE_PHRASES = ("overloaded", "shutting down", "not healthy", "timeout expired", "is not ready",
                       "unknown model", "was aborted")


class GenerationError(Exception):
    """The server refused or failed the request; `unavailable`: retrying later may succeed."""

    def __init__(self, message: str, unavailable: bool | None = None):
        super().__init__(message)
        self.message = message
        self.unavailable = any(p in message for p in UNAVAILABLE_PHRASES) if unavailable is None else unavailable


@dataclass
class Delta:
    """One response: per sample, the new text, tokens and log-prob maps; finish reasons so far."""
    texts: list[str]
    finish_reasons: list[str | None]
    num_output_tokens: list[int]
    num_input_tokens: int
    logprobs: list[list[dict] | None] | None   # per sample: one {id: {logprob, rank, decoded_token}} per token


def _tensor(name, value, dtype):
    t = grpcclient.InferInput(name, [1], dtype)
    t.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else bool))
    return t


def request_inputs(prompt: str, sampling: dict, stream: bool, logprobs: bool) -> list:
    flags = ["return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"]
    if logprobs:
        flags.append("return_logprobs")
    return [_tensor("text_input", prompt.encode("utf-8"), "BYTES"), _tensor("stream", stream, "BOOL"),
            _tensor("exclude_input_in_output", True, "BOOL"),
            _tensor("sampling_parameters", json.dumps(sampling).encode("utf-8"), "BYTES"),
            *(_tensor(flag, True, "BOOL") for flag in flags)]


def _bytes_elements(raw: bytes) -> list[str]:
    """A BYTES tensor's raw contents: each element is a 4-byte little-endian length, then its bytes."""
    out, i = [], 0
    while i < len(raw):
        size = int.from_bytes(raw[i:i + 4], "little")
        out.append(raw[i + 4:i + 4 + size].decode("utf-8", "replace"))
        i += 4 + size
    return out


def parse_response(response) -> Delta:
    """A ModelInferResponse's outputs, read off their raw bytes (InferResult.as_numpy costs more
    per response than everything else the front does with it)."""
    raw = {out.name: content for out, content in zip(response.outputs, response.raw_output_contents)}
    reasons = [None if r == "None" else r for r in _bytes_elements(raw.get("finish_reason", b""))]
    maps = _bytes_elements(raw.get("logprobs", b""))
    num_input = raw.get("num_input_tokens")
    return Delta(texts=_bytes_elements(raw.get("text_output", b"")), finish_reasons=reasons,
                 num_output_tokens=list(memoryview(raw.get("num_output_tokens", b"")).cast("I")),
                 num_input_tokens=memoryview(num_input).cast("I")[0] if num_input else 0,
                 logprobs=[json.loads(m) for m in maps] if maps else None)


class TritonLLM:
    """The `llm` model of a tritonserver, reached over gRPC."""

    def __init__(self, url: str, model_name: str):
        self.url, self.model_name = url, model_name
        self._client = None

    @property
    def client(self) -> aioclient.InferenceServerClient:
        """Made on first use: a gRPC aio channel belongs to the event loop it was made in."""
        if self._client is None:
            self._client = aioclient.InferenceServerClient(self.url)
        return self._client

    async def close(self):
        if self._client is not None:
            await self._client.close()

    async def is_ready(self) -> bool:
        try:
            return await self.client.is_model_ready(self.model_name)
        except Exception:  # noqa: BLE001 -- any failure to reach the server means "not ready"
            return False

    async def model_config(self) -> dict:
        return (await self.client.get_model_config(self.model_name, as_json=True))["config"]

    async def generate(self, prompt: str, sampling: dict, stream: bool, logprobs: bool):
        """Yields a Delta per response (one when not streaming); raises GenerationError."""
        inputs = request_inputs(prompt, sampling, stream, logprobs)

        async def the_request():
            yield {"model_name": self.model_name, "inputs": inputs, "request_id": uuid.uuid4().hex}
        responses = self.client.stream_infer(the_request())
        try:
            async for result, error in responses:
                if error is not None:
                    raise GenerationError(error.message() if hasattr(error, "message") else str(error))
                yield parse_response(result.get_response())
        except aioclient.InferenceServerException as e:
            raise GenerationError(e.message()) from None
        except grpc.RpcError as e:   # the server went away (restarting) or is not there yet
            raise GenerationError(f"the inference server is not reachable: {e.details()}", unavailable=True) from None
        finally:   # a no-op for a finished call; cancels the request when the caller left early
            responses.cancel()
