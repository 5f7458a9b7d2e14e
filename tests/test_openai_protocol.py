"""The OpenAI front's parts without a server: chat templates rendered as transformers renders them
(transformers' apply_chat_template is the reference), requests parsed into the engine's sampling
parameters with errors that name the field, and log-probs in OpenAI's shapes."""
import json
import os

import pytest
from transformers import PreTrainedTokenizerFast

from entrypoints import chat_template
from entrypoints.protocol import (CompletionLogprobs, RequestError, chat_logprobs, parse_chat, parse_completion,
                                  parse_generate)
from tests.checkpoints import CHAT_TEMPLATE, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "model_repository", "llm", "tiny-shakespeare")
SERVED = ["llm"]

# Templates in the styles models ship: Llama-3's (bos_token, namespace, loop.index0, strip,
# trim_blocks-sensitive layout), one with tojson and a system default, and this repository's own.
LLAMA3_STYLE = """{{ bos_token }}{% set ns = namespace(system=false) %}
{% for message in messages %}
{% if loop.index0 == 0 and message['role'] == 'system' %}{% set ns.system = true %}{% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""
TOJSON_STYLE = """{% if messages[0]['role'] != 'system' %}[SYS]{{ {'default': true, 'name': 'ünï'} | tojson }}[/SYS]
{% endif %}
{% for m in messages %}
    {%- if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}
{% endfor %}"""
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Speak as Hamlet."}, {"role": "user", "content": "  To be?  "},
     {"role": "assistant", "content": "Or not to be."}, {"role": "user", "content": "Héllo 日本 🙂"}],
    [{"role": "user", "content": "Name yourself", "name": "Horatio"}, {"role": "assistant", "content": "I am"}],
]


def default_template_source():
    with open(os.path.join(DEFAULT_MODEL, "tokenizer_config.json")) as f:
        return json.load(f)["chat_template"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return train_tokenizer()


@pytest.mark.parametrize("source", [CHAT_TEMPLATE, LLAMA3_STYLE, TOJSON_STYLE, "default"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_renders_as_transformers(hf_tokenizer, source, conversation, add_generation_prompt):
    source = default_template_source() if source == "default" else source
    messages = CONVERSATIONS[conversation]
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
    ours = chat_template.ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"})
    assert ours.render(messages, add_generation_prompt) == expected


@pytest.mark.parametrize("conversation", [0, 2])
def test_continue_final_message_as_transformers(hf_tokenizer, conversation):
    messages = CONVERSATIONS[conversation] + [{"role": "assistant", "content": "Thus conscience"}]
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                add_generation_prompt=False, continue_final_message=True)
    got = chat_template.ChatTemplate(CHAT_TEMPLATE).render(messages, False, continue_final_message=True)
    assert got == expected and got.endswith("Thus conscience")


def test_raise_exception_and_syntax_errors_are_chat_template_errors():
    with pytest.raises(chat_template.ChatTemplateError, match="unknown role tool"):
        chat_template.ChatTemplate(CHAT_TEMPLATE).render([{"role": "tool", "content": "x"}])
    with pytest.raises(chat_template.ChatTemplateError, match="does not compile"):
        chat_template.ChatTemplate("{% for m in messages %}")


def test_the_sandbox_refuses_unsafe_attribute_access():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(chat_template.ChatTemplateError):
        chat_template.ChatTemplate(evil).render([{"role": "user", "content": "x"}])


def test_load_finds_tokenizer_config_the_jinja_file_and_the_override(tmp_path, hf_tokenizer):
    assert chat_template.load(DEFAULT_MODEL).render([{"role": "user", "content": "Who's there?"}]) == \
        "<s>First Citizen:\nWho's there?\n\nSecond Citizen:\n"
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    hf_tokenizer.save_pretrained(tmp_path / "tok")   # wherever this transformers version writes it
    loaded = chat_template.load(str(tmp_path / "tok"))
    assert loaded is not None and loaded.special_tokens["bos_token"] == "<s>"
    assert loaded.render(CONVERSATIONS[0]) == hf_tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False,
                                                                               add_generation_prompt=True)
    (tmp_path / "override.jinja").write_text("{{ messages[-1]['content'] }}!")
    assert chat_template.load(str(tmp_path / "tok"), str(tmp_path / "override.jinja")).render(CONVERSATIONS[0]) == \
        "Hello there!"
    (tmp_path / "bare").mkdir()
    assert chat_template.load(str(tmp_path / "bare")) is None


def test_model_tokenizer_dir_follows_the_engine_rules(tmp_path):
    model_dir = tmp_path / "llm"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "weights").mkdir()
    params = {"parameters": {"model": {"string_value": "weights"}, "tokenizer": {"string_value": ""}}}
    assert chat_template.model_tokenizer_dir(params, str(model_dir)) == str(model_dir / "weights")
    (tmp_path / "elsewhere").mkdir()
    (model_dir / "1" / "model.json").write_text(json.dumps({"model": "elsewhere"}))
    assert chat_template.model_tokenizer_dir({}, str(model_dir), cwd=str(tmp_path)) == str(tmp_path / "elsewhere")
    (model_dir / "1" / "model.json").write_text(json.dumps({"model": "hub/name-not-here"}))
    assert chat_template.model_tokenizer_dir({}, str(model_dir), cwd=str(tmp_path)) is None


# ---- requests -----------------------------------------------------------------------------------

def refused(parse, body, field, status=400):
    with pytest.raises(RequestError) as e:
        parse(body)
    assert e.value.param == field and e.value.status == status, (e.value.param, e.value.status, e.value.message)
    return e.value.message


def test_completion_maps_openai_and_vllm_fields_to_sampling_parameters():
    g = parse_completion({"model": "llm", "prompt": "To be", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                          "n": 2, "stop": ["\n"], "seed": 3, "presence_penalty": 0.1, "frequency_penalty": 0.2,
                          "logprobs": 2, "top_k": 5, "min_tokens": 1, "ignore_eos": True, "user": "u1",
                          "stream": True, "stream_options": {"include_usage": True}, "best_of": None}, SERVED)
    assert g.prompts == ["To be"] and g.n == 2 and g.stream and g.include_usage and g.logprobs == 2
    assert g.sampling == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "n": 2, "stop": ["\n"], "seed": 3,
                          "presence_penalty": 0.1, "frequency_penalty": 0.2, "logprobs": 2, "top_k": 5,
                          "min_tokens": 1, "ignore_eos": True}
    assert parse_completion({"prompt": "x"}, SERVED).sampling == {"max_tokens": 16}   # OpenAI's default
    assert parse_completion({"prompt": ["a", "b"], "max_tokens": None}, SERVED).sampling == {"max_tokens": None}


def test_completion_refusals_name_the_field():
    def parse(body):
        return parse_completion(body, SERVED)
    refused(parse, {"model": "gpt-4", "prompt": "x"}, "model", 404)
    refused(parse, {}, "prompt")
    assert "token ids" in refused(parse, {"prompt": [1, 2, 3]}, "prompt")
    refused(parse, {"prompt": [[1, 2]]}, "prompt")
    refused(parse, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options")
    refused(parse, {"prompt": "x", "stream": "yes"}, "stream")
    refused(parse, {"prompt": "x", "n": True}, "n")
    refused(parse, {"prompt": "x", "suffix": "y"}, "suffix")
    refused(parse, {"prompt": "x", "echo": True, "logprobs": 1}, "echo")


def test_chat_request_fields():
    g, messages, options = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                 {"type": "text", "text": "b"}]}],
                                       "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 3}, SERVED)
    assert messages == [{"role": "user", "content": "ab"}] and g.logprobs == 3
    assert g.sampling == {"max_tokens": 9, "logprobs": 3, "add_special_tokens": False}   # the template writes them
    assert options == {"add_generation_prompt": True, "continue_final_message": False, "chat_template_kwargs": {}}
    g, _, _ = parse_chat({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, SERVED)
    assert g.logprobs == 0 and g.sampling == {"max_tokens": None, "logprobs": 0, "add_special_tokens": False}
    _, _, options = parse_chat({"messages": [{"role": "assistant", "content": "x"}], "continue_final_message": True},
                               SERVED)
    assert options["add_generation_prompt"] is False


def test_chat_refusals_name_the_field():
    def parse(body):
        return parse_chat(body, SERVED)
    user = [{"role": "user", "content": "x"}]
    refused(parse, {"messages": []}, "messages")
    refused(parse, {"messages": [{"content": "no role"}]}, "messages")
    assert "text parts" in refused(parse, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages")
    refused(parse, {"messages": user, "top_logprobs": 2}, "top_logprobs")
    refused(parse, {"messages": user, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")
    refused(parse, {"messages": user, "response_format": {"type": "json_object"}}, "response_format")
    refused(parse, {"messages": user, "add_generation_prompt": True, "continue_final_message": True},
            "continue_final_message")
    refused(parse, {"messages": user, "model": "other"}, "model", 404)
    # tools with tool_choice "none" are no request for tools
    assert parse_chat({"messages": user, "tools": [{"type": "function"}], "tool_choice": "none"}, SERVED)


def test_generate_passes_every_other_key_as_a_sampling_parameter():
    g = parse_generate({"prompt": "The capital of France is", "n": 1, "use_beam_search": False,
                        "temperature": 0.7, "max_tokens": 10, "stream": True})
    assert g.prompts == ["The capital of France is"] and g.stream
    assert g.sampling == {"n": 1, "use_beam_search": False, "temperature": 0.7, "max_tokens": 10}
    refused(parse_generate, {"text": "x"}, "prompt")


# ---- log-probs ----------------------------------------------------------------------------------

TOKEN_MAPS = [  # as the llm model's `logprobs` output carries them: the sampled token first
    {"17": {"logprob": -0.5, "rank": 2, "decoded_token": " be"}, "9": {"logprob": -0.25, "rank": 1,
                                                                       "decoded_token": " is"},
     "4": {"logprob": -3.0, "rank": 3, "decoded_token": "!"}},
    {"5": {"logprob": float("-inf"), "rank": 300, "decoded_token": "é"}, "6": {"logprob": -0.1, "rank": 1,
                                                                              "decoded_token": ","}},
]


def test_completion_logprobs_shape_and_offsets():
    lp = CompletionLogprobs()
    first, second = lp.convert(TOKEN_MAPS[:1]), lp.convert(TOKEN_MAPS[1:])
    assert first == {"tokens": [" be"], "token_logprobs": [-0.5], "top_logprobs": [{" be": -0.5, " is": -0.25, "!": -3.0}],
                     "text_offset": [0]}
    assert second["text_offset"] == [3] and second["token_logprobs"] == [-9999.0]   # -inf is no JSON number


def test_chat_logprobs_top_list_is_the_k_most_likely_by_rank():
    out = chat_logprobs(TOKEN_MAPS, 2)["content"]
    assert out[0]["token"] == " be" and out[0]["logprob"] == -0.5 and out[0]["bytes"] == list(b" be")
    assert [t["token"] for t in out[0]["top_logprobs"]] == [" is", " be"]   # ranks 1 and 2
    assert [t["token"] for t in out[1]["top_logprobs"]] == [","] and out[1]["bytes"] == list("é".encode())
    assert chat_logprobs(TOKEN_MAPS, 0)["content"][0]["top_logprobs"] == []


def test_the_default_models_template_is_the_one_its_training_script_writes():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_default_model",
                                                  os.path.join(REPO, "tools", "train_default_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.CHAT_TEMPLATE == default_template_source()
