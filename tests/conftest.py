import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.checkpoints import make_tiny_checkpoint  # noqa: E402

DEFAULT_MODEL = os.path.join(ROOT, "model_repository", "llm", "tiny-shakespeare")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """arch -> path of a tiny random-weight checkpoint (llama: untied; qwen2: qkv bias; qwen3: q/k norm)."""
    base = tmp_path_factory.mktemp("ckpt")
    return {arch: make_tiny_checkpoint(str(base / arch), arch) for arch in ("llama", "qwen2", "qwen3")}
