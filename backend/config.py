"""EngineConfig: the engine's settings, with vLLM's names, parsed and validated from Triton's string
parameters (config.pbtxt) or from a model.json of vLLM engine arguments (Triton's vLLM backend)."""
import json
import os
from typing import Callable
from dataclasses import dataclass, field, fields

import torch

from backend.quantization import checkpoint_fp8_layout


@dataclass
class EngineConfig:
    model: str = ""
    tokenizer: str = ""                    # default: the model directory
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 0                 # 0: the model's max_position_embeddings
    dtype: str = "auto"                    # auto: bf16 on CUDA (fp16 if unsupported), fp32 on CPU
    cpu_kvcache_space_gb: float = 1.0      # KV pool size on CPU (vLLM's VLLM_CPU_KVCACHE_SPACE)
    num_gpu_blocks_override: int = 0       # fixed KV pool size in blocks, on any device; 0: sized from memory
    device: str = "auto"                   # auto: cuda when available, else cpu
    seed: int = 0
    load_format: str = "auto"              # auto: safetensors; dummy: random weights for config.json
    enable_prefix_caching: bool = True
    enforce_eager: bool = False            # True: no CUDA graphs
    tensor_parallel_size: int = 1          # ranks (processes) one model is split across
    async_scheduling: str = "auto"         # overlap host work with the GPU step; auto: on CUDA
    scheduling_policy: str = "fcfs"        # fcfs, or priority (lower value first, then arrival)
    max_queue_size: int = 0                # requests waiting to start beyond which new ones are refused; 0: no limit
    queue_timeout_s: float = 0.0           # a request not started after this long fails (overload); 0: no limit
    target_itl_ms: float = 0.0             # step time to hold (prompt chunks sized by a fitted cost model); 0: off
    max_prefill_bypass: int = 8            # later, shorter prompts that may go before a prompt; 0: arrival order
    engine_core_process: str = "auto"      # the engine core (scheduler, model) in a process of its own; auto: on CUDA
    quantization: str = ""                 # "" (none; an FP8 checkpoint still loads as fp8) or fp8: W8A8
    kv_cache_dtype: str = "auto"           # auto: the model's dtype; fp8 (alias fp8_e4m3): e4m3 with k/v scales
    # Filled by resolve() from the fields above and the checkpoint, once for every part and rank.
    hf: dict = field(default=None, init=False, repr=False)                     # the model's config.json
    torch_device: torch.device = field(default=None, init=False, repr=False)
    torch_dtype: torch.dtype = field(default=None, init=False, repr=False)
    kv_cache_torch_dtype: torch.dtype = field(default=None, init=False, repr=False)

    DTYPES = ("auto", "float32", "float16", "bfloat16")
    QUANTIZATIONS = ("fp8",)                                   # besides none
    KV_CACHE_DTYPES = ("auto", "fp8")
    KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}

    @classmethod
    def from_parameters(cls, params: dict, model_dir_base: str = "") -> "EngineConfig":
        """Build from Triton's string parameters; unknown keys are an error (a typo must not pass)."""
        known = {f.name: f for f in fields(cls) if f.init}
        kwargs = {}
        for key, raw in params.items():
            if key not in known:
                raise ValueError(f"unknown parameter '{key}' (known: {', '.join(sorted(known))})")
            value = raw.get("string_value", "") if isinstance(raw, dict) else raw
            if isinstance(value, str):
                value = value.strip()
                if value == "":
                    continue
            kwargs[key] = _convert(key, value, known[key].type)
        config = cls(**kwargs)
        for key in ("model", "tokenizer"):
            path = getattr(config, key)
            if path and model_dir_base and not os.path.isabs(path):
                setattr(config, key, os.path.join(model_dir_base, path))
        config.validate()
        return config

    @classmethod
    def from_engine_args(cls, engine_args: dict, model_dir: str, warn: Callable[[str], None] = lambda msg: None,
                         cwd: str | None = None) -> "EngineConfig":
        """Build from vLLM engine arguments, as Triton's vLLM backend reads them from model.json
        (`model_dir`: the folder holding it). JSON values keep their types (true, 0.5, 256); null
        means the default. A key this engine does not know is refused with its name, unless it is
        one of IGNORED_ENGINE_ARGS (no effect on results: `warn` names it) or one of
        NOOP_ENGINE_ARGS at a value that changes nothing. Relative `model` and `tokenizer` paths
        are looked up in the server's working directory first (where vLLM looks), then in `model_dir`."""
        if not isinstance(engine_args, dict):
            raise ValueError(f"engine arguments must be a JSON object, got {type(engine_args).__name__}")
        known = {f.name: f for f in fields(cls) if f.init}
        kwargs, ignored = {}, []
        for key, value in engine_args.items():
            if key in known:
                if value is not None:
                    kwargs[key] = _from_json(key, value, known[key].type)
            elif key in IGNORED_ENGINE_ARGS:
                ignored.append(key)
            elif key in NOOP_ENGINE_ARGS:
                if value is not None and not any(_same(value, ok) for ok in NOOP_ENGINE_ARGS[key]):
                    raise ValueError(f"engine argument '{key}' is not supported except as "
                                     f"{' or '.join(json.dumps(v) for v in NOOP_ENGINE_ARGS[key])}, got {json.dumps(value)}")
                ignored.append(key)
            else:
                raise ValueError(f"unsupported engine argument '{key}' (supported: {', '.join(sorted(known))}; "
                                 f"ignored, as they do not change results: {', '.join(sorted(IGNORED_ENGINE_ARGS))})")
        if ignored:
            warn(f"engine arguments ignored (they change nothing here): {', '.join(ignored)}")
        kwargs["dtype"] = DTYPE_ALIASES.get(kwargs.get("dtype"), kwargs.get("dtype", "auto"))
        if kwargs.get("load_format") == "safetensors":
            kwargs["load_format"] = "auto"
        config = cls(**kwargs)
        for key in ("model", "tokenizer"):
            if getattr(config, key):
                setattr(config, key, _resolve_dir(key, getattr(config, key), model_dir, cwd or os.getcwd()))
        config.validate()
        return config

    def validate(self):
        def check(ok, name, what):
            if not ok:
                raise ValueError(f"parameter '{name}' {what}, got {getattr(self, name)!r}")
        self.async_scheduling, self.engine_core_process = (v.lower() for v in (self.async_scheduling,
                                                                                  self.engine_core_process))
        check(bool(self.model), "model", "must name a model directory")
        if self.load_format != "dummy":
            check(os.path.isfile(os.path.join(self.model, "config.json")), "model",
                  "must be a directory holding config.json")
        check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(self.max_num_batched_tokens >= self.max_num_seqs, "max_num_batched_tokens",
              f"must be >= max_num_seqs ({self.max_num_seqs}), so that every running request can decode each step")
        check(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size",
              "must be a power of two")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        check(self.max_model_len >= 0, "max_model_len", "must be >= 0")
        check(self.dtype in self.DTYPES, "dtype", f"must be one of {self.DTYPES}")
        check(self.cpu_kvcache_space_gb > 0, "cpu_kvcache_space_gb", "must be > 0")
        check(self.num_gpu_blocks_override >= 0, "num_gpu_blocks_override", "must be >= 0")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
              "must be auto, cpu or cuda[:N]")
        check(self.load_format in ("auto", "dummy"), "load_format", "must be auto or dummy")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(self.async_scheduling in ("auto", "true", "false"), "async_scheduling", "must be auto, true or false")
        check(self.engine_core_process in ("auto", "true", "false"), "engine_core_process", "must be auto, true or false")
        check(self.scheduling_policy in ("fcfs", "priority"), "scheduling_policy", "must be fcfs or priority")
        check(self.max_queue_size >= 0, "max_queue_size", "must be >= 0 (0: no limit)")
        check(0 <= self.queue_timeout_s < float("inf"), "queue_timeout_s", "must be >= 0 seconds (0: no limit)")
        check(0 <= self.target_itl_ms < float("inf"), "target_itl_ms", "must be >= 0 milliseconds (0: off)")
        check(self.max_prefill_bypass >= 0, "max_prefill_bypass", "must be >= 0 (0: prompts in arrival order)")
        if self.quantization.lower() in ("none", "null"):
            self.quantization = ""
        check(self.quantization in ("",) + self.QUANTIZATIONS, "quantization",
              f"must be fp8 or unset (none); supported: {', '.join(self.QUANTIZATIONS)}")
        self.kv_cache_dtype = self.KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        check(self.kv_cache_dtype in self.KV_CACHE_DTYPES, "kv_cache_dtype",
              "must be auto (the model's dtype), fp8 or fp8_e4m3")

    def resolve(self) -> "EngineConfig":
        """Settle what "auto" and 0 stand for: the device, the dtype, max_model_len and the model's
        config.json. Idempotent; the result pickles, so tensor-parallel ranks get the same values."""
        if self.hf is not None:
            return self
        with open(os.path.join(self.model, "config.json")) as f:
            self.hf = json.load(f)
        if self.device == "auto":
            self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.torch_device = torch.device(self.device)
        self.torch_dtype = self._pick_dtype()
        self.kv_cache_torch_dtype = torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else self.torch_dtype
        self.max_model_len = self.max_model_len or self.hf.get("max_position_embeddings", 4096)
        self._check_checkpoint_quantization()
        return self

    @property
    def uses_core_process(self) -> bool:
        """The engine core in a process of its own: asked for, or auto on CUDA, where a small model's
        steps would otherwise wait for the host behind the stub's other Python threads (measured in
        bench/RESULTS.md); on a CPU the core's own compute wants every core there is."""
        return self.engine_core_process == "true" or (
            self.engine_core_process == "auto" and self.torch_device.type == "cuda")

    def _check_checkpoint_quantization(self):
        """An FP8 checkpoint (config.json quantization_config: backend/quantization.py names the layouts)
        loads as fp8 whether or not `quantization` says so, as in vLLM; other methods are refused."""
        if self.load_format != "dummy" and checkpoint_fp8_layout(self.hf.get("quantization_config")):
            self.quantization = "fp8"

    def _pick_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.torch_device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32


# vLLM engine arguments that do not change what the engine computes, accepted and ignored.
IGNORED_ENGINE_ARGS = {
    "disable_log_stats": "logging",
    "disable_log_requests": "logging",
    "enable_log_requests": "logging",
    "max_log_len": "logging",
    "served_model_name": "Triton names the model after its folder",
    "trust_remote_code": "no code from the checkpoint runs: the architectures are built in",
    "disable_custom_all_reduce": "speed only",
    "distributed_executor_backend": "tensor-parallel ranks are always this engine's own processes",
    "swap_space": "a preempted request is recomputed, never swapped",
}
# vLLM engine arguments accepted only at the values that leave this engine as it is.
NOOP_ENGINE_ARGS = {
    "pipeline_parallel_size": (1,),
    "enable_lora": (False,),
    "tokenizer_mode": ("auto",),
    "enable_chunked_prefill": (True,),   # prompts are always chunked
}
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
# Parameters in config.pbtxt that Triton's vLLM backend reads itself; with a model.json they are
# accepted and ignored (metrics and the health check here are always on).
VLLM_BACKEND_PARAMETERS = ("REPORT_CUSTOM_METRICS", "ENABLE_VLLM_HEALTH_CHECK")
ENGINE_ARGS_FILE = "model.json"


def engine_config_for_model(model_config: dict, model_dir: str, version, warn: Callable[[str], None] = lambda m: None,
                            cwd: str | None = None) -> EngineConfig:
    """The EngineConfig of a Triton model (`model_config`: its configuration as JSON; `model_dir`:
    its folder). With <model_dir>/<version>/model.json (a repository written for Triton's vLLM
    backend), the settings come from that file (vLLM engine arguments); otherwise from the
    config's string `parameters`. A model with backend "vllm" must have a model.json."""
    params = {key: value.get("string_value", "") if isinstance(value, dict) else str(value)
              for key, value in (model_config.get("parameters") or {}).items()}
    path = os.path.join(model_dir, str(version), ENGINE_ARGS_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                engine_args = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not readable as JSON: {e}") from None
        for key in params:
            if key not in VLLM_BACKEND_PARAMETERS and key != "EXECUTION_ENV_PATH":
                raise ValueError(f"parameter '{key}' in config.pbtxt: this model's engine settings are in "
                                 f"{path} (vLLM engine arguments), and only there")
        if any(key in VLLM_BACKEND_PARAMETERS for key in params):
            warn(f"config.pbtxt parameters ignored: {', '.join(k for k in params if k in VLLM_BACKEND_PARAMETERS)}")
        try:
            return EngineConfig.from_engine_args(engine_args, os.path.dirname(path), warn=warn, cwd=cwd)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if model_config.get("backend") == "vllm":
        raise ValueError(f"{path} is missing: a model of backend \"vllm\" names its vLLM engine arguments there")
    return EngineConfig.from_parameters(params, model_dir_base=model_dir)


def _resolve_dir(key, path, model_dir, cwd):
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path
    for base in (cwd, model_dir):
        if os.path.isdir(os.path.join(base, path)):
            return os.path.abspath(os.path.join(base, path))
    raise ValueError(f"engine argument '{key}': no directory {path!r} in the server's working directory ({cwd}) "
                     f"or in {model_dir} (a Hugging Face Hub name is not downloaded: download the checkpoint "
                     "and name its directory)")


def _same(value, ok):
    return type(value) is type(ok) and value == ok or (isinstance(ok, bool) and str(value).lower() == str(ok).lower())


def _from_json(key, value, typ):
    """A JSON value for a field of type `typ`: numbers and booleans as they are (a boolean is no
    number), strings as in config.pbtxt; anything else is refused with the key's name."""
    typ = {"int": int, "float": float, "str": str, "bool": bool}.get(typ, typ) if isinstance(typ, str) else typ
    if isinstance(value, str):
        if typ is str:
            return value.strip()
        return _convert(key, value.strip(), typ)
    if isinstance(value, bool):
        if typ is bool:
            return value
        if typ is str and key in ("async_scheduling", "engine_core_process"):
            return "true" if value else "false"
    elif isinstance(value, (int, float)) and typ in (int, float):
        return _convert(key, value, typ)
    raise ValueError(f"engine argument '{key}' must be {typ.__name__}, got {json.dumps(value)}")


def _convert(key, value, typ):
    typ = {"int": int, "float": float, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return str(value).lower() in ("true", "1")
        if typ is int:
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"parameter '{key}' must be {typ.__name__}, got {value!r}") from None
