"""A step's CoreOutputs as one flat message, for the pipe from the engine core's process to the front.

Pickling a list of CoreOutput dataclasses costs ~2 us per request and step on each side of the pipe;
at 256 decoding requests that is a millisecond or more per step, spent while both processes hold
their GIL. Almost every output of a decode step is "plain": one sample (index 0) with new tokens,
nothing finished, no log-probs, no error. Those travel as flat lists of builtins (which pickle at
memcpy speed); every other output travels whole, at its position. The request ids go only when they
differ from the previous message's (steady decoding repeats them).

    StepEncoder().encode(outputs) -> message;  StepDecoder().decode(message) == outputs

One encoder and one decoder per pipe: each remembers the last request ids it saw, so messages must
be decoded in the order they were encoded (a pipe keeps it).
"""
from backend.errors import INTERNAL
from backend.outputs import CoreOutput, SampleUpdate


def is_plain(output: CoreOutput) -> bool:
    """Rebuilt exactly from (request id, first scheduled time, new token ids) alone?"""
    if len(output.samples) != 1 or output.finished or output.error is not None or output.error_kind != INTERNAL \
            or output.prompt_logprobs is not None:
        return False
    s = output.samples[0]
    return (s.index == 0 and s.finish_reason is None and s.cumulative_logprob is None and not s.replace
            and s.logprobs is None and type(s.new_token_ids) is list)


class StepEncoder:
    def __init__(self):
        self._last_request_ids: list[str] | None = None

    def encode(self, outputs: list[CoreOutput]) -> tuple:
        """(request ids or None if unchanged, first scheduled times, new-token counts, new token ids
        back to back, {position: CoreOutput} of the outputs that are not plain (count 0))."""
        request_ids = [o.request_id for o in outputs]
        first_scheduled_times = [o.first_scheduled_time for o in outputs]
        counts, token_ids, others = [], [], {}
        for position, o in enumerate(outputs):
            if is_plain(o):
                new = o.samples[0].new_token_ids
                counts.append(len(new))
                token_ids += new
            else:
                counts.append(0)
                others[position] = o
        if request_ids == self._last_request_ids:
            request_ids = None
        else:
            self._last_request_ids = request_ids
        return request_ids, first_scheduled_times, counts, token_ids, others


class StepDecoder:
    def __init__(self):
        self._last_request_ids: list[str] = []

    def decode(self, message: tuple) -> list[CoreOutput]:
        request_ids, first_scheduled_times, counts, token_ids, others = message
        if request_ids is None:
            request_ids = self._last_request_ids
        else:
            self._last_request_ids = request_ids
        outputs, start = [], 0
        for position, (request_id, first_scheduled_time, count) in enumerate(
                zip(request_ids, first_scheduled_times, counts)):
            if count == 0 and position in others:
                outputs.append(others[position])
                continue
            new_token_ids = token_ids[start:start + count]
            start += count
            outputs.append(CoreOutput(request_id, [SampleUpdate(0, new_token_ids)], False, None, INTERNAL,
                                      first_scheduled_time, None))
        return outputs
