"""core_message: a step's CoreOutputs cross the pipe as a flat message and come back exactly equal."""
import pickle
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from backend.core_message import StepDecoder, StepEncoder, is_plain
from backend.errors import INTERNAL, UNAVAILABLE
from backend.logprobs import TokenLogprobs
from backend.outputs import CoreOutput, SampleUpdate

finite = st.floats(allow_nan=False, allow_infinity=False)
token_ids = st.lists(st.integers(0, 200_000), max_size=4)
token_logprobs = st.builds(TokenLogprobs, st.integers(0, 200_000), finite, st.integers(1, 200_000),
                           st.lists(st.tuples(st.integers(0, 200_000), finite), max_size=3))
request_ids = st.sampled_from([f"req-{i}" for i in range(6)])


def sometimes(draw, strategy, usual):
    """Mostly `usual` (a plain output's value), else a draw: outputs one field away from plain are common."""
    return draw(strategy) if draw(st.integers(0, 3)) == 0 else usual


@st.composite
def sample_updates(draw, index=0):
    return SampleUpdate(sometimes(draw, st.integers(0, 3), index), draw(token_ids),
                        sometimes(draw, st.sampled_from(["stop", "length", "abort"]), None),
                        sometimes(draw, finite, None), sometimes(draw, st.just(True), False),
                        sometimes(draw, st.lists(token_logprobs, max_size=2), None))


@st.composite
def core_outputs(draw):
    num_samples = sometimes(draw, st.integers(0, 3), 1)
    return CoreOutput(
        draw(request_ids), [draw(sample_updates(index=i)) for i in range(num_samples)],
        sometimes(draw, st.just(True), False), sometimes(draw, st.text(max_size=8), None),
        sometimes(draw, st.just(UNAVAILABLE), INTERNAL), draw(st.one_of(st.none(), finite)),
        sometimes(draw, st.lists(st.one_of(st.none(), token_logprobs), max_size=3), None))


@st.composite
def steps(draw):
    """Messages in pipe order; a step sometimes repeats the previous step's request ids (steady decoding)."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        step = draw(st.lists(core_outputs(), max_size=8))
        if out and draw(st.booleans()):
            step = draw(st.lists(core_outputs(), min_size=len(out[-1]), max_size=len(out[-1])))
            step = [replace(o, request_id=previous.request_id) for o, previous in zip(step, out[-1])]
        out.append(step)
    return out


@settings(max_examples=300, deadline=None)
@given(steps())
def test_decode_of_encode_is_the_outputs(messages):
    encoder, decoder = StepEncoder(), StepDecoder()
    for outputs in messages:
        message = pickle.loads(pickle.dumps(encoder.encode(outputs)))   # as the pipe carries it
        assert decoder.decode(message) == outputs


def test_steady_decoding_sends_ids_once_and_rare_outputs_whole():
    encoder = StepEncoder()
    step = [CoreOutput(f"r{i}", [SampleUpdate(0, [i])], first_scheduled_time=1.0) for i in range(4)]
    first = encoder.encode(step)
    assert first[0] == ["r0", "r1", "r2", "r3"] and first[3] == [0, 1, 2, 3] and not first[4]
    step[2] = CoreOutput("r2", [SampleUpdate(0, [7], "length")], finished=True)
    second = encoder.encode(step)
    assert second[0] is None and second[2] == [1, 1, 0, 1] and second[4] == {2: step[2]}
    assert not is_plain(step[2]) and is_plain(step[0])
