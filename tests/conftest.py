"""Shared fixtures: tiny random checkpoints written once per test session, in both official layouts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never touch the user's cache or the network.
os.environ.setdefault("OSSRUN_CACHE_DIR", tempfile.mkdtemp(prefix="ossrun-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Under pytest-xdist (`make test`: two workers) the cores are shared between the workers.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

from ossrun.model.checkpoint import write_random_checkpoint  # noqa: E402
from ossrun.model.config import PRESETS  # noqa: E402

TINY = PRESETS["tiny"]


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="where the model, engine and kernel tests that take the `device` fixture run")


def pytest_configure(config):
    if config.getoption("--device") == "cpu":
        # On CPU tensors Triton kernels run only in its interpreter, and Triton reads this when a
        # kernel is decorated (when its module is imported): it must be set before any import.
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """`--device cuda` runs the tests that take this fixture on the GPU (skipped where there is none)."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA device here")
    return torch.device(name)
# Same architecture with a small vocabulary: fast where the vocabulary is not what is tested.
TINY_SMALL_VOCAB = TINY.replace(vocab_size=1024)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{"original", "hf", "small_vocab_hf", "small_vocab_original"} → checkpoint dirs (seed 1)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "original": write_random_checkpoint(TINY, root / "tiny-original", "original", seed=1),
        "hf": write_random_checkpoint(TINY, root / "tiny-hf", "hf", seed=1),
        "small_vocab_original": write_random_checkpoint(TINY_SMALL_VOCAB, root / "sv-original", "original", seed=2),
        "small_vocab_hf": write_random_checkpoint(TINY_SMALL_VOCAB, root / "sv-hf", "hf", seed=2),
    }


def load_hf_reference(path: Path):
    """Hugging Face's GptOssForCausalLM on the same checkpoint, in float32 (MXFP4 dequantised exactly).

    Dequantisation is asked for, not left to transformers: from 5.25 it depends on `kernels`, and with Triton
    installed (the interpreter tests need it) it reaches for a hub kernel on the CPU, which offline is an error."""
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", quantization_config=Mxfp4Config(dequantize=True)
    )
    return model.float().eval()


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """The real server on the demo model (the default one), with an API token; shared by the demo-model
    and playground tests so the model loads once. Verbose: its log (`server.log`) has a line per answer."""
    from ossrun.model.resolve import resolve_model
    from tests.server_util import start_server

    s = start_server(resolve_model("demo"), tmp_path_factory.mktemp("demo-data"), "--rate-limit", "100000", "-v", token="secret")
    yield s
    s.stop()
