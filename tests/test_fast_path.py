"""The two precisions: the flag reaches every layer, and the fast path stays close to the exact one."""

import pytest
import torch

from ossrun.engine.async_engine import resolve_dtype
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.gpt_oss import GptOss


def test_precision_reaches_every_layer(checkpoints):
    model = GptOss.from_checkpoint(load_checkpoint(checkpoints["small_vocab_original"]), torch.float32, precision="fast")
    assert model.precision == "fast"
    assert all(b.precision == b.attn.precision == b.mlp.precision == "fast" for b in model.blocks)


def test_unknown_precision_is_refused(checkpoints):
    with pytest.raises(ValueError, match="precision"):
        GptOss.from_checkpoint(load_checkpoint(checkpoints["small_vocab_original"]), torch.float32, precision="fp8")


def test_dtype_defaults_from_the_precision():
    assert resolve_dtype("exact") == torch.float32
    assert resolve_dtype("fast") == torch.bfloat16
    assert resolve_dtype("exact", "bfloat16") == torch.bfloat16  # an explicit dtype wins
    with pytest.raises(ValueError):
        resolve_dtype("exact", "float16")
