"""Checkpoints: both official on-disk layouts, read memory-mapped, and random ones written in them.

One place maps names. Internally every tensor goes by its `original/` (reference) name; the
Hugging Face layout differs only in names and in splitting the fused qkv projection. MXFP4 expert
tensors are returned packed (uint8) exactly as stored.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ossrun.model import mxfp4
from ossrun.model.config import ConfigError, ModelConfig
from ossrun.model.safetensors_io import DTYPE_NAMES, SafetensorsError, TensorSpec, open_mmap, write_streaming

log = logging.getLogger(__name__)

LAYOUTS = ("original", "hf")
# Shard size for written HF checkpoints (the hub's own shards are ~5 GB).
HF_SHARD_BYTES = 4 * 1024**3


@dataclass(slots=True)
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # original names; experts packed uint8, the rest as stored (bf16)
    layout: str
    path: Path


# -- names ----------------------------------------------------------------------------------------

_HF_LAYER_NAMES = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
_HF_GLOBAL_NAMES = {"embedding.weight": "model.embed_tokens.weight", "norm.scale": "model.norm.weight", "unembedding.weight": "lm_head.weight"}
_QKV_PARTS = ("q_proj", "k_proj", "v_proj")


def original_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of an `original/` checkpoint, in the reference's order."""
    c, bf16, u8 = config, torch.bfloat16, torch.uint8
    qkv = c.q_size + 2 * c.kv_size
    specs = [TensorSpec("embedding.weight", bf16, (c.vocab_size, c.hidden_size))]
    for i in range(c.num_hidden_layers):
        p = f"block.{i}."
        specs += [
            TensorSpec(p + "attn.norm.scale", bf16, (c.hidden_size,)),
            TensorSpec(p + "attn.qkv.weight", bf16, (qkv, c.hidden_size)),
            TensorSpec(p + "attn.qkv.bias", bf16, (qkv,)),
            TensorSpec(p + "attn.sinks", bf16, (c.num_attention_heads,)),
            TensorSpec(p + "attn.out.weight", bf16, (c.hidden_size, c.q_size)),
            TensorSpec(p + "attn.out.bias", bf16, (c.hidden_size,)),
            TensorSpec(p + "mlp.norm.scale", bf16, (c.hidden_size,)),
            TensorSpec(p + "mlp.gate.weight", bf16, (c.num_experts, c.hidden_size)),
            TensorSpec(p + "mlp.gate.bias", bf16, (c.num_experts,)),
            TensorSpec(p + "mlp.mlp1_weight.blocks", u8, (c.num_experts, 2 * c.intermediate_size, c.hidden_size // 32, 16)),
            TensorSpec(p + "mlp.mlp1_weight.scales", u8, (c.num_experts, 2 * c.intermediate_size, c.hidden_size // 32)),
            TensorSpec(p + "mlp.mlp1_bias", bf16, (c.num_experts, 2 * c.intermediate_size)),
            TensorSpec(p + "mlp.mlp2_weight.blocks", u8, (c.num_experts, c.hidden_size, c.intermediate_size // 32, 16)),
            TensorSpec(p + "mlp.mlp2_weight.scales", u8, (c.num_experts, c.hidden_size, c.intermediate_size // 32)),
            TensorSpec(p + "mlp.mlp2_bias", bf16, (c.num_experts, c.hidden_size)),
        ]
    specs += [TensorSpec("norm.scale", bf16, (c.hidden_size,)), TensorSpec("unembedding.weight", bf16, (c.vocab_size, c.hidden_size))]
    return specs


def hf_name(original: str) -> str:
    if original in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[original]
    layer, rest = re.fullmatch(r"block\.(\d+)\.(.+)", original).groups()
    return f"model.layers.{layer}.{_HF_LAYER_NAMES[rest]}"


def _qkv_rows(config: ModelConfig) -> dict[str, tuple[int, int]]:
    q, kv = config.q_size, config.kv_size
    return {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}


def hf_specs(config: ModelConfig) -> list[tuple[TensorSpec, str, tuple[int, int] | None]]:
    """HF tensors as (spec, original name it comes from, row slice of that tensor or None)."""
    out = []
    rows = _qkv_rows(config)
    for spec in original_specs(config):
        match = re.fullmatch(r"block\.(\d+)\.attn\.qkv\.(weight|bias)", spec.name)
        if match:
            layer, kind = match.groups()
            for part in _QKV_PARTS:
                begin, end = rows[part]
                shape = (end - begin, *spec.shape[1:])
                out.append((TensorSpec(f"model.layers.{layer}.self_attn.{part}.{kind}", spec.dtype, shape), spec.name, (begin, end)))
        else:
            out.append((TensorSpec(hf_name(spec.name), spec.dtype, spec.shape), spec.name, None))
    return out


# -- loading --------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A directory that looks like a checkpoint but cannot be one (a config that is not JSON or lacks the model's
    shape, weights missing, cut short or of other shapes than the config says): the operator's mistake, said in one
    line that names the file."""


def _config_json(path: Path) -> object:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not JSON ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror})") from None
    return data


def detect_layout(path: Path) -> tuple[str, Path]:
    """→ (layout, directory). A hub snapshot holds both; `original/` is preferred (one file, no renames)."""
    path = Path(path)
    if (path / "original" / "config.json").exists():
        return "original", path / "original"
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json and no original/config.json: not a gpt-oss checkpoint")
    data = _config_json(config_file)
    return ("hf" if isinstance(data, dict) and "model_type" in data else "original"), path


def read_config(path: str | Path) -> ModelConfig:
    """The architecture of a checkpoint in either layout, without touching its weights; a CheckpointError naming
    config.json when it describes no gpt-oss model."""
    layout, directory = detect_layout(Path(path))
    config_file = directory / "config.json"
    data = _config_json(config_file)
    try:
        return ModelConfig.from_original_json(data) if layout == "original" else ModelConfig.from_hf_json(data)
    except ConfigError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None


INDEX_FILE = "model.safetensors.index.json"


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files a checkpoint loads (of the layout `detect_layout` chooses: a hub snapshot's other copy
    is not read). With the hub's index exactly the files it names, as transformers reads them: a stray file beside
    the shards (an older save, a copy of another model) is not read, and a missing shard is named."""
    directory = detect_layout(Path(path))[1]
    if not (directory / INDEX_FILE).exists():
        return sorted(directory.glob("*.safetensors"))
    files = [directory / name for name in _indexed_names(directory / INDEX_FILE)]
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: missing, though {INDEX_FILE} names it (a partial download?)")
    return files


def _indexed_names(index: Path) -> list[str]:
    """The file names an index's `weight_map` ({tensor: file}) holds, sorted."""
    data = _config_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{index}: no weight_map of tensor names to file names")
    return sorted(set(weight_map.values()))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Config and weights, checked against each other before anything uses them (headers only: no weight is read)."""
    layout, directory = detect_layout(Path(path))
    config = read_config(directory)
    files = weight_files(directory)
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors files")
    stored: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        tensors = _open_weights(file)
        _refuse_duplicates(file, tensors, origin)
        stored.update(tensors)
        origin.update(dict.fromkeys(tensors, file))
    _check_tensors(config, layout, stored, origin, directory)
    _check_finite(config, layout, stored, origin)
    tensors = stored if layout == "original" else _from_hf_names(config, stored)
    log.info("loaded %s checkpoint from %s (%d tensors)", layout, directory, len(tensors))
    return Checkpoint(config, tensors, layout, directory)


def _refuse_duplicates(file: Path, tensors: dict[str, torch.Tensor], origin: dict[str, Path]) -> None:
    """A tensor two files hold: which copy is meant cannot be told (one of them is likely another model's)."""
    for name in tensors:
        if name in origin:
            raise CheckpointError(f"{file}: {name} is also in {origin[name]} (two copies of one tensor: remove the "
                                  "stray file)")


def _open_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        return open_mmap(file)
    except SafetensorsError as exc:
        raise CheckpointError(f"{file}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{file} cannot be read ({exc.strerror})") from None


def _check_tensors(config: ModelConfig, layout: str, stored: dict[str, torch.Tensor], origin: dict[str, Path],
                   directory: Path) -> None:
    """Every tensor the config implies is there, of its shape and kind (packed uint8 or floating point; float32
    where bf16 is usual is fine), and the weights hold as many layers as the config says: a config that disagrees
    with its weights would otherwise fail deep in the model, or serve fewer layers than the file holds."""
    config_file = directory / "config.json"
    layers = _layers_stored(stored)
    if layers != config.num_hidden_layers:
        raise CheckpointError(f"{config_file} says num_hidden_layers={config.num_hidden_layers}, but the weights in "
                              f"{directory} hold {layers} layers")
    for spec, _ in _layout_specs(config, layout):
        tensor = stored.get(spec.name)
        if tensor is None:
            _refuse_unquantized(spec.name, stored, config_file)
            raise CheckpointError(f"{directory}: no .safetensors file holds {spec.name}, which {config_file.name} implies "
                                  "(a partial download?)")
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"{origin[spec.name]}: {spec.name} has shape {tuple(tensor.shape)}, but "
                                  f"{config_file} implies {spec.shape}")
        packed = spec.dtype == torch.uint8
        if (tensor.dtype == torch.uint8) != packed or not (packed or tensor.is_floating_point()):
            expected = "U8 (packed MXFP4)" if packed else "floating point (BF16, F16 or F32)"
            raise CheckpointError(f"{origin[spec.name]}: {spec.name} is {DTYPE_NAMES[tensor.dtype]}, expected {expected}")


def _layout_specs(config: ModelConfig, layout: str) -> list[tuple[TensorSpec, str]]:
    """The tensors of a checkpoint in `layout`, each with the original name it is (or is part of)."""
    if layout == "original":
        return [(spec, spec.name) for spec in original_specs(config)]
    return [(spec, source) for spec, source, _ in hf_specs(config)]


# The small dense tensors (by original name): norms, sinks, biases and the router. A NaN or inf in one makes every
# logit NaN, and they are ~0.1% of the weights (9M values for 20b: ~40 ms, 54M for 120b); the big matrices are not read.
_CHECKED_FINITE = re.compile(r"(\.scale|sinks|bias|gate\.weight)$")


def _check_finite(config: ModelConfig, layout: str, stored: dict[str, torch.Tensor], origin: dict[str, Path]) -> None:
    """A corrupt or overflowed small tensor is refused by name: it would make every answer noise ("!!!!" greedy)."""
    for spec, source in _layout_specs(config, layout):
        # A float64 sum is non-finite iff a value is (no float32 values overflow it), at 10x isfinite's speed on bf16.
        if _CHECKED_FINITE.search(source) and not math.isfinite(stored[spec.name].sum(dtype=torch.float64)):
            raise CheckpointError(f"{origin[spec.name]}: {spec.name} holds NaN or infinite values (a corrupt file?)")


def _refuse_unquantized(missing: str, stored: dict[str, torch.Tensor], config_file: Path) -> None:
    """An HF checkpoint whose experts are plain floats (transformers' dequantized save, the hub's -BF16 uploads) is
    complete, just not MXFP4: it lacks the packed `..._blocks` and holds the unquantized tensor, and its config has
    no MXFP4 quantization_config. Said as such, not as a partial download that sends the operator to re-download."""
    plain = stored.get(missing.removesuffix("_blocks")) if missing.endswith("_blocks") else None
    quantization = _config_json(config_file).get("quantization_config") or {}
    if plain is None or (isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4"):
        return
    raise CheckpointError(f"{config_file}: experts stored unquantized ({DTYPE_NAMES[plain.dtype].lower()}), e.g. a "
                          "dequantized or -BF16 upload; ossrun serves the MXFP4 checkpoints (openai/gpt-oss-20b / -120b)")


def _layers_stored(stored: dict[str, torch.Tensor]) -> int:
    """1 + the highest layer index among the tensors' names (both layouts)."""
    found = (re.match(r"(?:block|model\.layers)\.(\d+)\.", name) for name in stored)
    return max((int(match[1]) + 1 for match in found if match), default=0)


def _from_hf_names(config: ModelConfig, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names → original names, q/k/v fused (`_check_tensors` has seen every part)."""
    tensors = {}
    for spec in original_specs(config):
        match = re.fullmatch(r"block\.(\d+)\.attn\.qkv\.(weight|bias)", spec.name)
        if match:
            layer, kind = match.groups()
            parts = [stored[f"model.layers.{layer}.self_attn.{part}.{kind}"] for part in _QKV_PARTS]
            tensors[spec.name] = torch.cat(parts, dim=0)
        else:
            tensors[spec.name] = stored[hf_name(spec.name)]
    return tensors


# -- random checkpoints ---------------------------------------------------------------------------

class RandomWeights:
    """Deterministic random tensors by name, so the two layouts of one seed hold the same values.

    Magnitudes keep activations in a realistic range through many layers, and the expert scales
    are chosen so that SwiGLU pre-activations cross the ±7 clamp on a visible fraction of values.
    """

    def __init__(self, config: ModelConfig, seed: int):
        self.config = config
        self.seed = seed
        c = config
        fp4_std = 2.93  # RMS of the FP4 code values
        e1 = round(math.log2(5.0 / (math.sqrt(c.hidden_size) * fp4_std))) + mxfp4.SCALE_BIAS
        e2 = round(math.log2(0.5 / (math.sqrt(c.intermediate_size) * fp4_std))) + mxfp4.SCALE_BIAS
        self.scale_bytes = {"mlp1": (e1 - 1, e1, e1 + 1), "mlp2": (e2 - 1, e2, e2 + 1)}

    def _generator(self, name: str, device: torch.device) -> torch.Generator:
        return torch.Generator(device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))

    def _std(self, name: str) -> float:
        c = self.config
        if name == "embedding.weight" or name.endswith("sinks"):
            return 1.0
        if name.endswith(("qkv.weight", "gate.weight")) or name == "unembedding.weight":
            return c.hidden_size ** -0.5
        if name.endswith("out.weight"):
            return c.q_size ** -0.5
        if name.endswith("mlp1_bias"):
            return 0.5
        return 0.1  # biases and the deviation of norm scales from 1

    def make(self, spec: TensorSpec, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor `spec` names, made on `device` (another device's generator: same law, other values)."""
        device = torch.device(device)
        g = self._generator(spec.name, device)
        if spec.dtype == torch.uint8:
            kind = "mlp1" if "mlp1" in spec.name else "mlp2"
            if spec.name.endswith(".blocks"):
                return torch.randint(0, 256, spec.shape, dtype=torch.uint8, generator=g, device=device)
            choice = torch.tensor(self.scale_bytes[kind], dtype=torch.uint8, device=device)
            return choice[torch.randint(0, len(choice), spec.shape, generator=g, device=device)]
        values = torch.randn(spec.shape, generator=g, device=device) * self._std(spec.name)
        if spec.name.endswith(".scale"):
            values += 1.0
        return values.to(spec.dtype)


def random_tensors(config: ModelConfig, device: torch.device | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a random checkpoint (original names), made directly on `device`.

    For benchmarks on a GPU: the 20b preset's 13 GB never touch a file or host memory.
    """
    weights = RandomWeights(config, seed)
    return {spec.name: weights.make(spec, device) for spec in original_specs(config)}


def write_once(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(directory)` into a directory of this process's own, then renamed to `path` in one step: a killed
    write never leaves a half checkpoint at `path`, and of two processes writing the same one into a shared cache
    the first rename wins and the other drops its copy (the same bytes) instead of failing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_partials(path)
    partial = Path(tempfile.mkdtemp(prefix=_partial_prefix(path) + f"{socket.gethostname()}-{os.getpid()}-",
                                    dir=path.parent))
    try:
        write(partial)
        partial.rename(path)
    except OSError:
        if not (path / "config.json").exists():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def _partial_prefix(path: Path) -> str:
    return f"{path.name}.partial-"


def _remove_dead_writers_partials(path: Path) -> None:
    """A writer killed mid-write leaves its directory (up to the 20b preset's 13 GB) behind; the next writer of
    the same checkpoint removes it. Only a directory of this host whose process is gone: a live writer's, or one
    of another machine sharing the cache, is never touched."""
    pattern = re.compile(re.escape(_partial_prefix(path)) + re.escape(socket.gethostname()) + r"-(\d+)-[^/]*$")
    for leftover in path.parent.glob(_partial_prefix(path) + "*"):
        match = pattern.match(leftover.name)
        if match and not _process_alive(int(match.group(1))):
            log.info("removing %s, left by a writer that was stopped mid-write", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_random_checkpoint(config: ModelConfig, out: str | Path, layout: str = "original", seed: int = 0) -> Path:
    """Write a random checkpoint in an official layout, one tensor in memory at a time (see `write_checkpoint`)."""
    return write_checkpoint(config, out, RandomWeights(config, seed).make, layout)


def write_checkpoint(config: ModelConfig, out: str | Path, make: Callable[[TensorSpec], torch.Tensor],
                     layout: str = "original") -> Path:
    """Write a checkpoint in an official layout; `make(spec)` gives each tensor of `original_specs` by its
    original name (bf16, experts packed uint8), one at a time, so no checkpoint is ever whole in memory.

    `original`: `config.json` + `model.safetensors` as in the hub's `original/` folder (pass the
    folder itself as `out`, or a root and the loader finds `original/`). `hf`: the hub root layout,
    sharded with `model.safetensors.index.json` when over one shard.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "original":
        (out / "config.json").write_text(json.dumps(config.to_original_json(), indent=2))
        write_streaming(out / "model.safetensors", original_specs(config), make)
        return out
    (out / "config.json").write_text(json.dumps(config.to_hf_json(), indent=2))
    entries = hf_specs(config)
    by_name = {spec.name: (source, rows) for spec, source, rows in entries}
    shards = _shard([spec for spec, _, _ in entries])
    source_specs = {spec.name: spec for spec in original_specs(config)}

    def make_hf(spec: TensorSpec) -> torch.Tensor:
        source, rows = by_name[spec.name]
        tensor = make(source_specs[source])
        return tensor[rows[0]:rows[1]].clone() if rows else tensor

    if len(shards) == 1:
        write_streaming(out / "model.safetensors", shards[0], make_hf)
        return out
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_streaming(out / name, shard, make_hf)
        weight_map.update({spec.name: name for spec in shard})
    total = sum(spec.nbytes for spec, _, _ in entries)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def _shard(specs: list[TensorSpec]) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > HF_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards
