"""The embedded demo model: a tiny gpt-oss the project trained (`ossrun train-demo`), shipped as a
compact file and expanded to a full official checkpoint in the cache on first use.

The compact file holds every tensor of the `original/` checkpoint (bf16, experts packed MXFP4)
except the two vocabulary matrices, of which it keeps only the rows of the tokens the model was
trained on, plus one "unknown token" embedding. Expanding puts that embedding in every other row of
the embedding and zeros in every other row of the unembedding (so unused tokens get logit 0, which
training kept below every wanted token), then writes the checkpoint with `write_checkpoint`: the
served model is a plain 201088-token gpt-oss checkpoint, loaded like any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ossrun.model.checkpoint import write_checkpoint, write_once
from ossrun.model.config import ModelConfig
from ossrun.model.safetensors_io import SafetensorsError, TensorSpec, open_mmap, read_header, write_streaming

log = logging.getLogger(__name__)

WEIGHTS_FILE = Path(__file__).with_name("demo_weights.safetensors")
# The compact file's own tensors next to the checkpoint's (original) names.
TOKEN_IDS = "demo.token_ids"
EMBEDDING_ROWS = "demo.embedding_rows"
UNKNOWN_EMBEDDING = "demo.unknown_embedding"
UNEMBEDDING_ROWS = "demo.unembedding_rows"


def write_compact(path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the compact file: `tensors` by name (checkpoint names and the four `demo.*` ones)."""
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    write_streaming(path, specs, lambda spec: tensors[spec.name], {"config": json.dumps(config.to_original_json()), **metadata})


def read_compact(path: Path = WEIGHTS_FILE) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """→ (config, tensors, metadata) of a compact file."""
    _, header = read_header(path)
    metadata = header.get("__metadata__", {})
    return ModelConfig.from_original_json(json.loads(metadata["config"])), open_mmap(path), metadata


def is_compact(path: Path) -> bool:
    """Whether `path` is a compact demo file (what `ossrun train-demo --out FILE` writes)."""
    try:
        _, header = read_header(path)
    except (SafetensorsError, OSError):  # not safetensors at all: the caller says what it wanted
        return False
    return TOKEN_IDS in header and "config" in header.get("__metadata__", {})


def expand(compact: Path, out: Path) -> Path:
    """Write the full `original/` checkpoint of a compact file to `out`."""
    config, tensors, _ = read_compact(compact)
    ids = tensors[TOKEN_IDS]
    vocab_rows = {
        "embedding.weight": (tensors[UNKNOWN_EMBEDDING], tensors[EMBEDDING_ROWS]),
        "unembedding.weight": (torch.zeros_like(tensors[UNKNOWN_EMBEDDING]), tensors[UNEMBEDDING_ROWS]),
    }

    def make(spec: TensorSpec) -> torch.Tensor:
        if spec.name in vocab_rows:
            default, rows = vocab_rows[spec.name]
            full = default.expand(spec.shape).clone()
            full[ids] = rows
            return full
        return tensors[spec.name]

    return write_checkpoint(config, out, make, "original")


def demo_dir(cache: Path, compact: Path = WEIGHTS_FILE) -> Path:
    """The demo checkpoint in the cache, expanded on first use; named by the compact file's hash, so
    retrained weights never meet an old expansion."""
    digest = hashlib.sha256(compact.read_bytes()).hexdigest()[:12]
    path = cache / "models" / f"demo-{digest}"
    if not (path / "config.json").exists():
        log.info("expanding the demo model to %s", path)
        write_once(path, lambda out: expand(compact, out))
    return path
