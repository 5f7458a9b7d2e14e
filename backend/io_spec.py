"""The model's input and output tensors: the one list that auto_complete_config declares
(triton_glue/model.py) and that model_repository/llm/config.pbtxt spells out
(tests/test_io_spec.py checks that they agree). The names, types and shapes are those of Triton's
vLLM backend, plus `prompt`, an alias of text_input (so that /generate {"prompt": ...} works).
Every input is optional: a request names its prompt in text_input or prompt (serving.py checks)."""

# (name, Triton data type, dims)
INPUTS = (
    ("text_input", "TYPE_STRING", (1,)),
    ("prompt", "TYPE_STRING", (1,)),
    ("stream", "TYPE_BOOL", (1,)),
    ("sampling_parameters", "TYPE_STRING", (1,)),
    ("exclude_input_in_output", "TYPE_BOOL", (1,)),
    ("return_finish_reason", "TYPE_BOOL", (1,)),
    ("return_num_input_tokens", "TYPE_BOOL", (1,)),
    ("return_num_output_tokens", "TYPE_BOOL", (1,)),
    ("return_cumulative_logprob", "TYPE_BOOL", (1,)),
    ("return_logprobs", "TYPE_BOOL", (1,)),
)

# One element per sample (n > 1, or the n best beams), except num_input_tokens.
OUTPUTS = (
    ("text_output", "TYPE_STRING", (-1,)),
    ("finish_reason", "TYPE_STRING", (-1,)),
    ("num_input_tokens", "TYPE_UINT32", (1,)),
    ("num_output_tokens", "TYPE_UINT32", (-1,)),
    ("cumulative_logprob", "TYPE_FP32", (-1,)),
    ("logprobs", "TYPE_STRING", (-1,)),
)


def input_configs():
    """INPUTS as model-config dicts (what pb_utils.ModelConfig.add_input takes)."""
    return [{"name": n, "data_type": t, "dims": list(d), "optional": True} for n, t, d in INPUTS]


def output_configs():
    return [{"name": n, "data_type": t, "dims": list(d)} for n, t, d in OUTPUTS]
