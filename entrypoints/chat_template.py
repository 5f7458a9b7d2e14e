"""Chat messages -> a prompt, with the tokenizer's jinja `chat_template`, rendered as transformers'
apply_chat_template renders it (a sandboxed environment with trim_blocks and lstrip_blocks, the
`tojson` filter, `raise_exception` and `strftime_now`; the special tokens as variables)."""
import json
import os
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    pass


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def load(tokenizer_dir: str | None, override: str | None = None) -> "ChatTemplate | None":
    """The model's chat template: `override` (a file, or the template itself, as vLLM's
    --chat-template), else the folder's chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates: "default"). None if there is none."""
    config = {}
    if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer_config.json")):
        with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
            config = json.load(f)
    special = {name: _token_text(config[name]) for name in SPECIAL_TOKENS if config.get(name) is not None}
    source = None
    if override:
        source = open(override).read() if os.path.isfile(override) else override
    elif tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "chat_template.jinja")):
        with open(os.path.join(tokenizer_dir, "chat_template.jinja")) as f:
            source = f.read()
    else:
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
    return ChatTemplate(source, special) if source else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict | None = None):
        self.special_tokens = dict(special_tokens or {})
        try:
            self.template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               continue_final_message: bool = False, **kwargs) -> str:
        variables = {**self.special_tokens, **kwargs, "messages": messages,
                     "add_generation_prompt": add_generation_prompt}
        try:
            prompt = self.template.render(**variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
        if continue_final_message:   # end the prompt where the final message's text ends
            final = messages[-1]["content"].strip()
            cut = prompt.rfind(final)
            if not final or cut < 0:
                raise ChatTemplateError("'continue_final_message': the final message's text is not in the prompt")
            prompt = prompt[:cut + len(final)]
        return prompt


def model_tokenizer_dir(model_config: dict, model_dir: str, cwd: str | None = None) -> str | None:
    """Where the served model's tokenizer lives, by the engine's rules (backend/config.py): a
    repository written for Triton's vLLM backend names it in <version>/model.json (relative to the
    server's working directory, then to that folder); otherwise config.pbtxt's `tokenizer` or
    `model` parameter (relative to the model's folder)."""
    versions = sorted((int(d) for d in os.listdir(model_dir) if d.isdigit()), reverse=True) \
        if os.path.isdir(model_dir) else []
    for version in versions[:1]:
        path = os.path.join(model_dir, str(version), "model.json")
        if os.path.isfile(path):
            with open(path) as f:
                args = json.load(f)
            name = args.get("tokenizer") or args.get("model")
            if not isinstance(name, str):
                return None
            name = os.path.expanduser(name)
            for base in (cwd or os.getcwd(), os.path.dirname(path)):
                if os.path.isdir(os.path.join(base, name)):
                    return os.path.abspath(os.path.join(base, name))
            return None
    params = {k: (v.get("string_value", "") if isinstance(v, dict) else str(v)).strip()
              for k, v in (model_config.get("parameters") or {}).items()}
    name = params.get("tokenizer") or params.get("model")
    if not name:
        return None
    path = os.path.join(model_dir, os.path.expanduser(name))   # an absolute name stays as it is
    return path if os.path.isdir(path) else None


def model_max_len(model_config: dict, folder: str | None) -> int | None:
    """The engine's max_model_len as configured (parameter or model.json), else the checkpoint's
    max_position_embeddings (the engine's default); None if neither is known."""
    params = {k: (v.get("string_value", "") if isinstance(v, dict) else str(v)).strip()
              for k, v in (model_config.get("parameters") or {}).items()}
    if params.get("max_model_len", "0").isdigit() and int(params.get("max_model_len") or 0) > 0:
        return int(params["max_model_len"])
    path = os.path.join(folder, "config.json") if folder else ""
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("max_position_embeddings")
    return None
