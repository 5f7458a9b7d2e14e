"""End-to-end fixtures: a tiny random checkpoint and a tritonserver serving it (see harness.py)."""
import pytest

from .harness import Server, make_model_repository


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tests.checkpoints import CHAT_TEMPLATE, make_tiny_checkpoint
    # Long context so that a request can run for a few seconds (cancellation, shutdown tests).
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-llama")), arch="llama",
                                max_position_embeddings=4096, chat_template=CHAT_TEMPLATE)


def serve_tiny_model(base, tiny_model, **parameters):
    """A started, ready server of the tiny model (a generator: it stops the server when closed)."""
    repo = make_model_repository(str(base / "model_repository"), tiny_model, num_gpu_blocks_override="2048",
                                 **parameters)
    srv = Server(repo, str(base / "tritonserver.log")).start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model):
    yield from serve_tiny_model(tmp_path_factory.mktemp("server"), tiny_model)
