"""LoRA adapters in PEFT's format on the attention projections, applied per row of a flat batch.

Supported targets are `q_proj`, `k_proj`, `v_proj` and `o_proj`: PEFT's LoRA wraps `nn.Linear`
modules, and in gpt-oss those are the attention projections (and the router); the experts are
packed 3-D MXFP4 parameters that PEFT does not wrap as Linear layers. The router is left out on
purpose: a low-rank change there re-routes tokens, which is rarely what a fine-tune wants and
would make expert choice adapter-dependent.

One step may mix rows of the base model and of several adapters: rows are grouped by adapter and
each group gets its own two thin matmuls (x·Aᵀ·Bᵀ·scale), added to the base projection.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from struct import error as struct_error
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ossrun.model.config import ModelConfig
from ossrun.model.safetensors_io import DTYPE_NAMES, TensorSpec, read_whole, write_streaming

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MAX_RANK = 32
PEFT_DEFAULT_ALPHA = 8  # `LoraConfig.lora_alpha`'s default: what PEFT uses when the config leaves it out
# A sanity bound, not a limit of the maths: fine-tunes use alphas from 1 to a few thousand (rsLoRA); at 1e30 and
# beyond the product overflows the activations into inf/NaN, and every answer of the adapter is garbage.
MAX_ALPHA = 1e6
# PEFT `LoraConfig` settings that change what an adapter computes, which we do not implement: refused when set (at
# their defaults an adapter is plain LoRA). Any other setting either means plain LoRA or only matters in training.
_UNSUPPORTED = {
    "use_dora": "DoRA, weight-decomposed LoRA",
    "alora_invocation_tokens": "activated LoRA, applied only from its invocation tokens on",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "modules_to_save": "fully trained modules beside the LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "lora_bias": "a trained bias on lora_B",
    "layer_replication": "layers repeated",
    "target_parameters": "LoRA on parameters, such as the experts'",
}
_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.lora_([AB])(?:\.default)?\.weight")
_PROJECTION = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)")


class AdapterError(ValueError):
    """An adapter that cannot be used with this model; the message says why."""


class AdapterPairMismatch(AdapterError):
    """Each file is a valid adapter half on its own, but the two disagree: the config's `r` is not the rank of the
    tensors, or the config targets other projections than the tensors adapt (one file belongs to another pair)."""


@dataclass(slots=True)
class LoraAdapter:
    name: str
    rank: int
    scaling: float
    # layer → target → (A [r, in], B [out, r])
    weights: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for layer in self.weights.values() for a, b in layer.values())


def _in_out(config: ModelConfig, target: str) -> tuple[int, int]:
    c = config
    return {"q_proj": (c.hidden_size, c.q_size), "k_proj": (c.hidden_size, c.kv_size),
            "v_proj": (c.hidden_size, c.kv_size), "o_proj": (c.q_size, c.hidden_size)}[target]


def load_peft_adapter(path: str | Path, config: ModelConfig, name: str, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> LoraAdapter:
    """Read and check a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`).

    Each file is checked on its own first (the config's settings; the tensors' names, shapes, dtypes and values),
    then the pair: a config whose `r` differs from the rank the tensors have, or that targets other projections than
    the tensors adapt, raises `AdapterPairMismatch`, so a caller can tell "this file fits another partner" from "this
    file is wrong"."""
    path = Path(path)
    rank, scaling, (targets, every_target) = _read_settings(path, config, name)
    pairs = _read_pairs(path, config, name)
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) > 1:
        raise AdapterError(f"adapter {name}: its tensors have different ranks {sorted(ranks)}")
    (tensor_rank,) = ranks
    if tensor_rank > MAX_RANK:
        raise AdapterError(f"adapter {name}: rank {tensor_rank} is over the maximum of {MAX_RANK}")
    if tensor_rank != rank:
        raise AdapterPairMismatch(f"adapter {name}: adapter_config.json says r={rank} but the tensors of "
                                  f"adapter_model.safetensors have rank {tensor_rank}")
    _check_modules(targets, every_target, set(pairs), name)
    adapter = LoraAdapter(name, rank, scaling)
    for (layer, target), (a, b) in pairs.items():
        adapter.weights.setdefault(layer, {})[target] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
    return adapter


def _check_modules(targets: frozenset[tuple[int, str]], every_target: bool, adapted: set[tuple[int, str]], name: str) -> None:
    """The tensors adapt exactly the projections the config targets (PEFT would ignore the others, and leave a target
    without tensors at its initial weights): else AdapterPairMismatch, naming the difference."""
    def listed(modules: set[tuple[int, str]]) -> str:
        return _listed([f"layer {layer} {target}" for layer, target in sorted(modules)])

    if adapted - targets:
        raise AdapterPairMismatch(f"adapter {name}: adapter_model.safetensors adapts {listed(adapted - targets)}, which "
                                  "adapter_config.json does not target")
    if every_target and targets - adapted:
        raise AdapterPairMismatch(f"adapter {name}: adapter_config.json targets {listed(targets - adapted)}, which "
                                  "adapter_model.safetensors has no tensors for")


def _read_settings(path: Path, config: ModelConfig, name: str) -> tuple[int, float, tuple[frozenset[tuple[int, str]], bool]]:
    """`adapter_config.json` checked on its own → (rank, scaling, where it applies: `_targeted`). Types are checked as
    PEFT's `LoraConfig` declares them, so a wrong one is named here rather than surfacing as a Python error or as a
    silently different adapter."""
    try:
        settings = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8 at all
        raise AdapterError(f"adapter {name}: adapter_config.json unreadable: {exc}") from None
    if not isinstance(settings, dict):
        raise AdapterError(f"adapter {name}: adapter_config.json must hold a JSON object")
    rank = settings.get("r")
    if settings.get("peft_type", "LORA") != "LORA" or not _is_int(rank) or rank < 1:
        raise AdapterError(f"adapter {name}: not a PEFT LoRA adapter (peft_type LORA with an integer r)")
    if rank > MAX_RANK:
        raise AdapterError(f"adapter {name}: rank {rank} is over the maximum of {MAX_RANK}")
    for key, what in _UNSUPPORTED.items():
        if settings.get(key):
            raise AdapterError(f"adapter {name}: {key} ({what}) is not supported")
    if settings.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name}: bias {settings['bias']!r} (biases trained beside the LoRA) is not supported")
    targets = _targeted(settings, config, name)
    alpha = settings.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not _is_number(alpha) or not math.isfinite(alpha) or abs(alpha) > MAX_ALPHA:
        raise AdapterError(f"adapter {name}: lora_alpha must be a number of magnitude at most {MAX_ALPHA:g}, not {alpha!r}")
    rslora = settings.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError(f"adapter {name}: use_rslora must be true or false, not {rslora!r}")
    return rank, alpha / math.sqrt(rank) if rslora else alpha / rank, targets


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a rank


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _targeted(settings: dict, config: ModelConfig, name: str) -> tuple[frozenset[tuple[int, str]], bool]:
    """Where the config applies the LoRA → (the (layer, projection) pairs, whether the tensors must adapt every one).

    Matched as PEFT matches it (`check_target_module_exists`) against the module names of transformers'
    GptOssForCausalLM: `exclude_modules` first (a list entry names a module by its full path or by a dotted tail of
    it; a string is a regular expression the full path must match), then `target_modules` (the same two forms, and
    "all-linear": every linear layer but the output head, in gpt-oss the attention projections; PEFT saves it as the
    full paths), a list entry other than a full path only in `layers_to_transform` (the layer index found by
    `layers_pattern`). A module matched that we do not adapt is refused, and so is an entry that names no module.
    Without `target_modules` (PEFT has no default for gpt-oss) the tensors say which projections they adapt."""
    targets, exclude = settings.get("target_modules"), settings.get("exclude_modules")
    _check_layer_settings(settings, name)
    modules = _module_names(config)
    excluded = _matching(exclude, modules, "exclude_modules", name)
    kept = [m for m in modules if m not in excluded]
    in_layers = _in_layers(modules, settings, name)
    if targets is None or isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        entries = list(TARGETS) if targets is None else targets
        unmatched = [t for t in entries if not any(_names(m, t) for m in modules)]
        if unmatched:
            raise AdapterError(f"adapter {name}: target_modules {unmatched} name no module of the model (we adapt "
                               f"{', '.join(TARGETS)})")
        matched = [m for m in kept if m in entries or any(_names(m, t) for t in entries) and m in in_layers]
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        matched = [m for m in kept if _projection(m) is not None]
    elif isinstance(targets, str):
        chosen = _matching(targets, modules, "target_modules", name)
        if not chosen:
            raise AdapterError(f"adapter {name}: target_modules {targets!r} matches no module of the model")
        matched = [m for m in kept if m in chosen]
    else:
        raise AdapterError(f"adapter {name}: target_modules must be a list of module names or a regular expression, "
                           f"not {targets!r}")
    others = sorted({re.sub(r"^model\.(layers\.\d+\.)?", "", m) for m in matched if _projection(m) is None})
    if others:
        raise AdapterError(f"adapter {name}: target_modules matches modules we do not adapt: {_listed(others)} "
                           f"(only {', '.join(TARGETS)} of the attention)")
    if not matched:
        raise AdapterError(f"adapter {name}: adapter_config.json targets no module (exclude_modules and "
                           "layers_to_transform leave none)")
    return frozenset(_projection(m) for m in matched), targets is not None


def _check_layer_settings(settings: dict, name: str) -> None:
    """The types PEFT declares for the settings that narrow the targets (a layers_pattern is a regular expression)."""
    layers, pattern, exclude = settings.get("layers_to_transform"), settings.get("layers_pattern"), settings.get("exclude_modules")
    if not (layers is None or _is_int(layers) or isinstance(layers, list) and all(_is_int(i) for i in layers)):
        raise AdapterError(f"adapter {name}: layers_to_transform must be a layer index or a list of them, not {layers!r}")
    for key, value in (("layers_pattern", pattern), ("exclude_modules", exclude)):
        if not (value is None or isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise AdapterError(f"adapter {name}: {key} must be a string or a list of strings, not {value!r}")
    for value in [pattern] if isinstance(pattern, str) else pattern or []:
        try:
            re.compile(value)  # compiling is bounded by the pattern's length; matching runs in `_user_regex_matches`
        except re.error as exc:
            raise AdapterError(f"adapter {name}: layers_pattern {value!r} is not a regular expression ({exc})") from None


def _matching(spec: str | list[str] | None, modules: list[str], key: str, name: str) -> set[str]:
    """The modules a `target_modules` / `exclude_modules` value names: a string as a regular expression the full path
    must match, a list by names."""
    if not spec:
        return set()
    if isinstance(spec, list):
        return {m for m in modules if any(_names(m, entry) for entry in spec)}
    found = _user_regex_matches(spec, "fullmatch", modules, f"{key} {spec!r}", name)
    return {m for m, groups in zip(modules, found) if groups is not None}


def _in_layers(modules: list[str], settings: dict, name: str) -> set[str]:
    """PEFT's `layers_to_transform`: the modules whose first numbered path segment (after one of `layers_pattern`)
    is among them."""
    layers, pattern = settings.get("layers_to_transform"), settings.get("layers_pattern")
    if layers is None or layers == []:
        return set(modules)
    wanted = {layers} if _is_int(layers) else set(layers)
    patterns = [pattern] if isinstance(pattern, str) else pattern or []
    if patterns:
        found: list[tuple | None] = [None] * len(modules)
        for p in patterns:  # the first pattern that finds a layer index decides
            matches = _user_regex_matches(rf"(?:^|.*?\.){p}\.(\d+)\.", "match", modules, f"layers_pattern {p!r}", name)
            found = [f if f is not None else g for f, g in zip(found, matches)]
    else:
        found = [m.groups() if (m := _ANY_LAYER.match(module)) else None for module in modules]
    return {m for m, groups in zip(modules, found) if groups is not None and int(groups[-1]) in wanted}


_ANY_LAYER = re.compile(r".*?\.[^.]*\.(\d+)\.")  # PEFT's layer index without a layers_pattern


# A regular expression from an adapter's config runs in a child process with a deadline: Python's `re` backtracks
# without bound (`(.*)*x` against a 31-character module name runs for minutes) and holds the GIL all the while, so
# in the server's own process one upload would freeze every request.
_REGEX_SECONDS = 5.0
_REGEX_CHILD = ("import json, re, sys\n"
                "regex, how, texts = json.load(sys.stdin)\n"
                "try:\n    compiled = re.compile(regex)\n"
                "except re.error as exc:\n    json.dump({'error': str(exc)}, sys.stdout); sys.exit()\n"
                "json.dump({'groups': [m and m.groups() for m in map(getattr(compiled, how), texts)]}, sys.stdout)\n")


def _user_regex_matches(regex: str, how: str, texts: list[str], what: str, name: str) -> list[tuple | None]:
    """`re.<how>(regex, text).groups()` (how: "match" or "fullmatch"; None where it does not match) for each text,
    computed in a child process that is killed after `_REGEX_SECONDS`. `what` names the setting in the errors."""
    try:
        child = subprocess.run([sys.executable, "-I", "-S", "-c", _REGEX_CHILD], input=json.dumps([regex, how, texts]),
                               capture_output=True, text=True, timeout=_REGEX_SECONDS)
    except subprocess.TimeoutExpired:
        raise AdapterError(f"adapter {name}: {what} did not finish matching the model's {len(texts)} module names "
                           f"in {_REGEX_SECONDS:g} s (a regular expression that backtracks without end)") from None
    if child.returncode != 0:
        raise AdapterError(f"adapter {name}: {what} could not be matched ({child.stderr.strip()[-200:]})")
    answer = json.loads(child.stdout)
    if "error" in answer:
        raise AdapterError(f"adapter {name}: {what} is not a regular expression ({answer['error']})")
    return [tuple(g) if g is not None else None for g in answer["groups"]]


def _module_names(config: ModelConfig) -> list[str]:
    """The names PEFT matches `target_modules` against: the modules of transformers' GptOssForCausalLM."""
    layer = ("", ".self_attn", *(f".self_attn.{t}" for t in TARGETS), ".mlp", ".mlp.router", ".mlp.experts",
             ".input_layernorm", ".post_attention_layernorm")
    return ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head",
            *(f"model.layers.{i}{part}" for i in range(config.num_hidden_layers) for part in layer)]


def _names(module: str, entry: str) -> bool:
    """PEFT's rule for a list entry: the module's full name, or a tail of it after a dot."""
    return module == entry or module.endswith("." + entry)


def _projection(module: str) -> tuple[int, str] | None:
    match = _PROJECTION.fullmatch(module)
    return (int(match[1]), match[2]) if match else None


def _listed(items: list, most: int = 8) -> str:
    return ", ".join(map(str, items[:most])) + (f" and {len(items) - most} more" if len(items) > most else "")


def _read_pairs(path: Path, config: ModelConfig, name: str) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """`adapter_model.safetensors` checked on its own (the rank is the tensors' own) → (layer, target) → (A, B). Read
    whole into memory, not mapped: the adapter is served from what was read, whatever becomes of the file."""
    try:
        stored = read_whole(path / "adapter_model.safetensors")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, MemoryError, struct_error) as exc:
        raise AdapterError(f"adapter {name}: adapter_model.safetensors is not a readable safetensors file ({exc})") from None
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in stored.items():
        match = _NAME.fullmatch(key)
        if match is None:
            raise AdapterError(f"adapter {name}: unexpected tensor {key}")
        layer, target, half = int(match[1]), match[2], match[3]
        if layer >= config.num_hidden_layers:
            raise AdapterError(f"adapter {name}: tensor for layer {layer}, the model has {config.num_hidden_layers}")
        if not tensor.is_floating_point():
            raise AdapterError(f"adapter {name}: tensor {key} is {DTYPE_NAMES[tensor.dtype]}; adapters hold F32, F16 or BF16 numbers")
        halves.setdefault((layer, target), {})[half] = tensor
    pairs = {}
    for (layer, target), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name}: layer {layer} {target} lacks lora_A or lora_B")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = _in_out(config, target)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or b.shape[1] != a.shape[0]:
            raise AdapterError(f"adapter {name}: layer {layer} {target} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                               f"expected (r, {fan_in}) and ({fan_out}, r)")
        if a.shape[0] < 1:
            raise AdapterError(f"adapter {name}: layer {layer} {target} has rank 0")
        if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):  # every answer would be NaN
            raise AdapterError(f"adapter {name}: layer {layer} {target} holds NaN or infinite numbers")
        pairs[(layer, target)] = (a, b)
    if not pairs:
        raise AdapterError(f"adapter {name}: no LoRA tensors")
    return pairs


def write_random_adapter(config: ModelConfig, out: str | Path, rank: int = 8, alpha: float | None = None, seed: int = 0,
                         targets: tuple[str, ...] = TARGETS, base_model: str = "openai/gpt-oss-20b") -> Path:
    """A random PEFT adapter (B not zero, so it changes the output) for tests and demos."""
    if rank > MAX_RANK:
        raise AdapterError(f"rank {rank} is over the maximum of {MAX_RANK}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha if alpha is not None else 2 * rank, "target_modules": list(targets),
                "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
                "base_model_name_or_path": base_model, "task_type": "CAUSAL_LM", "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    g = torch.Generator().manual_seed(seed)
    specs, values = [], {}
    for layer in range(config.num_hidden_layers):
        for target in targets:
            fan_in, fan_out = _in_out(config, target)
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            values[prefix + ".lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / math.sqrt(fan_in)
            values[prefix + ".lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * (0.5 / rank)
    specs = [TensorSpec(n, torch.float32, tuple(t.shape)) for n, t in values.items()]
    write_streaming(out / "adapter_model.safetensors", specs, lambda spec: values[spec.name])
    return out


@dataclass(slots=True)
class LoraBatch:
    """Which rows of this step use which adapter: [(row indices, adapter)], base rows in no group."""

    groups: list[tuple[torch.Tensor, LoraAdapter]]

    def delta(self, layer: int, target: str, x: torch.Tensor, out_features: int) -> torch.Tensor | None:
        """The low-rank addition to `target`'s output for every row (zeros for base rows), or None."""
        result = None
        for rows, adapter in self.groups:
            pair = adapter.weights.get(layer, {}).get(target)
            if pair is None:
                continue
            a, b = pair
            if result is None:
                result = x.new_zeros(x.shape[0], out_features)
            xs = x.index_select(0, rows)
            result.index_add_(0, rows, ((xs @ a.T.to(x.dtype)) @ b.T.to(x.dtype)) * adapter.scaling)
        return result
