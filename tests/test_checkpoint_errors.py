"""Broken checkpoints (cut short, garbage, a config.json that disagrees with its weights or describes no model) are
the operator's mistake: `CheckpointError` naming the file, and from the command line one line and exit 2 (README).
They were tracebacks (ValueError, KeyError, TypeError, AttributeError) and exit 1; an empty `{}` config was read as
the 20b defaults, a config with fewer layers than its weights loaded silently."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ossrun.model.checkpoint import CheckpointError, load_checkpoint
from ossrun.model.safetensors_io import TensorSpec, open_mmap, write_streaming
from tests.server_util import free_port
from tests.test_cli import _one_clear_line, ossrun

Break = Callable[[Path, Path, str], None]  # (source checkpoint, broken copy to fill, layout)


def _link_weights(source: Path, out: Path) -> None:
    (out / "model.safetensors").symlink_to(source / "model.safetensors")


def _config(edit: Callable[[dict, str], object]) -> Break:
    """The weights as they are, config.json edited (`edit` returns the new JSON value)."""
    def make(source: Path, out: Path, layout: str) -> None:
        _link_weights(source, out)
        data = json.loads((source / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(edit(data, layout)))
    return make


def _set(key: str, value: object) -> Callable[[dict, str], dict]:
    return lambda data, layout: {**data, key: value}


def _layers(n: int) -> Callable[[dict, str], dict]:
    """num_hidden_layers changed, and HF's layer_types with it (else the config disagrees with itself first)."""
    def edit(data: dict, layout: str) -> dict:
        types = {"layer_types": ["sliding_attention", "full_attention"] * (n // 2)} if layout == "hf" else {}
        return {**data, "num_hidden_layers": n, **types}
    return edit


def _without(original_key: str, hf_key: str) -> Callable[[dict, str], dict]:
    return lambda data, layout: {k: v for k, v in data.items() if k != (original_key if layout == "original" else hf_key)}


def _weights(edit: Callable[[dict[str, torch.Tensor], str], None]) -> Break:
    """config.json as it is, the weights rewritten after `edit` changes the tensors dict."""
    def make(source: Path, out: Path, layout: str) -> None:
        (out / "config.json").write_text((source / "config.json").read_text())
        tensors = open_mmap(source / "model.safetensors")
        edit(tensors, layout)
        specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
        write_streaming(out / "model.safetensors", specs, lambda spec: tensors[spec.name])
    return make


def _bytes(content: Callable[[bytes], bytes]) -> Break:
    def make(source: Path, out: Path, layout: str) -> None:
        (out / "config.json").write_text((source / "config.json").read_text())
        (out / "model.safetensors").write_bytes(content((source / "model.safetensors").read_bytes()))
    return make


def _index(data: dict, out: Path) -> None:
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": data}))


def _shard_missing(source: Path, out: Path, layout: str) -> None:
    """The hub's index names two shards; only the first is there."""
    (out / "config.json").write_text((source / "config.json").read_text())
    (out / "model-00001-of-00002.safetensors").symlink_to(source / "model.safetensors")
    names = list(open_mmap(source / "model.safetensors"))
    _index({name: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, name in enumerate(names)}, out)


def _two_copies(source: Path, out: Path, layout: str) -> None:
    """No index, and a second file holding the same tensors (another save left beside this one)."""
    _config(lambda data, layout: data)(source, out, layout)
    (out / "copy.safetensors").symlink_to(source / "model.safetensors")


def _nan_norm(tensors: dict, layout: str) -> None:
    name = "norm.scale" if layout == "original" else "model.norm.weight"
    tensors[name] = torch.full_like(tensors[name], float("nan"))


def _overflowing(tensors: dict, layout: str) -> None:
    """Finite but huge attention output weights (not checked at load: too big to read): the residual overflows to
    inf and the next norm makes every logit NaN."""
    name = "block.0.attn.out.weight" if layout == "original" else "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = torch.full_like(tensors[name], 1e38)


def _drop_q(tensors: dict, layout: str) -> None:
    del tensors["block.0.attn.qkv.weight" if layout == "original" else "model.layers.0.self_attn.q_proj.weight"]


def _scales_as_float(tensors: dict, layout: str) -> None:
    name = "block.1.mlp.mlp1_weight.scales" if layout == "original" else "model.layers.1.mlp.experts.gate_up_proj_scales"
    tensors[name] = tensors[name].float()


# case → (how to break a tiny checkpoint, what the message says, the file it names)
CASES: dict[str, tuple[Break, str, str]] = {
    "cut short": (_bytes(lambda data: data[:1_000_000]), "cut short", "model.safetensors"),
    "garbage weights": (_bytes(lambda data: os.urandom(100_000)), "not a safetensors file", "model.safetensors"),
    "empty weights": (_bytes(lambda data: b""), "not a safetensors file", "model.safetensors"),
    "hidden_size disagrees": (_config(_set("hidden_size", 128)), "has shape (201088, 64), but", "model.safetensors"),
    "more layers": (_config(_layers(6)), "num_hidden_layers=6, but the weights", "config.json"),
    "fewer layers": (_config(_layers(2)), "hold 4 layers", "config.json"),
    "a shape key missing": (_config(_without("hidden_size", "num_local_experts")), "not a gpt-oss config: it lacks", "config.json"),
    "a string for a number": (_config(_set("num_hidden_layers", "4")), "num_hidden_layers must be an integer", "config.json"),
    "NaN rope_theta": (_config(_set("rope_theta", float("nan"))), "rope_theta must be a number greater than 0", "config.json"),
    "a JSON array": (_config(lambda data, layout: [1, 2]), "not a gpt-oss config: an array", "config.json"),
    "an empty object": (_config(lambda data, layout: {}), "it lacks num_hidden_layers", "config.json"),
    "a tensor missing": (_weights(_drop_q), "no .safetensors file holds", ""),
    "float scales": (_weights(_scales_as_float), "is F32, expected U8", "model.safetensors"),
    "a NaN norm": (_weights(_nan_norm), "holds NaN or infinite values (a corrupt file?)", "model.safetensors"),
    "an indexed shard missing": (_shard_missing, "missing, though model.safetensors.index.json names it",
                                 "model-00002-of-00002.safetensors"),
    "a tensor in two files": (_two_copies, ".safetensors (two copies of one tensor", "model.safetensors"),
}


def _broken(case: str, layout: str, checkpoints: dict[str, Path], tmp_path: Path) -> tuple[Path, str]:
    """A broken copy of the session's tiny checkpoint (as `make-model --preset tiny` writes it) → (dir, expected)."""
    make, expected, file = CASES[case]
    out = tmp_path / f"{layout}-{case.replace(' ', '-')}"
    out.mkdir()
    make(checkpoints[layout], out, layout)
    return out, f"{out}/{file}" if file else str(out)


@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_loader_says_which_file_is_wrong_and_how(case, layout, checkpoints, tmp_path):
    path, names = _broken(case, layout, checkpoints, tmp_path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(names) and CASES[case][1] in message and "\n" not in message, message


# Each layout at least once, and every reader (original and HF config, header, tensor checks).
CLI_CASES = [("cut short", "original"), ("garbage weights", "hf"), ("hidden_size disagrees", "original"),
             ("hidden_size disagrees", "hf"), ("more layers", "hf"), ("a shape key missing", "hf"),
             ("a string for a number", "original"), ("a JSON array", "original"), ("an empty object", "original"),
             ("a tensor missing", "hf"), ("float scales", "original"), ("an indexed shard missing", "hf"),
             ("a tensor in two files", "original"), ("a NaN norm", "hf")]


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_with_an_index_only_the_files_it_names_are_read(layout, checkpoints, tmp_path):
    """A stray file beside the index (an older save, another model's copy) overrode the checkpoint's tensors
    (hunt round 22 B-F3); transformers reads only what the index names, and so does ossrun now."""
    source = checkpoints[layout]
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    (tmp_path / "model.safetensors").symlink_to(source / "model.safetensors")
    _index(dict.fromkeys(open_mmap(source / "model.safetensors"), "model.safetensors"), tmp_path)
    norm = "norm.scale" if layout == "original" else "model.norm.weight"
    stray = torch.zeros_like(open_mmap(source / "model.safetensors")[norm])
    write_streaming(tmp_path / "old.safetensors", [TensorSpec(norm, stray.dtype, tuple(stray.shape))], lambda spec: stray)
    assert torch.equal(load_checkpoint(tmp_path).tensors["norm.scale"], load_checkpoint(source).tensors["norm.scale"])


def _dequantized(source: Path, out: Path, layout: str) -> None:
    """What transformers' `Mxfp4Config(dequantize=True)` + `save_pretrained` writes: bf16 experts, no quantization_config."""
    _weights(_experts_as_bf16)(source, out, layout)
    data = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in data.items() if k != "quantization_config"}))


def _experts_as_bf16(tensors: dict, layout: str) -> None:
    for name in [name for name in tensors if name.endswith(("_blocks", "_scales"))]:
        packed = tensors.pop(name)
        if name.endswith("_blocks"):
            tensors[name.removesuffix("_blocks")] = torch.zeros(packed.shape[:2] + (packed.shape[2] * 32,), dtype=torch.bfloat16)


def test_unquantized_experts_are_named_as_such(checkpoints, tmp_path):
    """They were refused as "a partial download?", sending the operator to download again (hunt round 22 B-F6)."""
    _dequantized(checkpoints["hf"], tmp_path, "hf")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path)
    assert str(caught.value) == (f"{tmp_path}/config.json: experts stored unquantized (bf16), e.g. a dequantized or "
                                 "-BF16 upload; ossrun serves the MXFP4 checkpoints (openai/gpt-oss-20b / -120b)")


def _rope(key: str, value: object) -> Callable[[dict, str], dict]:
    return lambda data, layout: {**data, "rope_scaling": {**data["rope_scaling"], key: value}}


# Values ossrun would have run as something else (hunt round 22 B-F5, B-F8): (layout, edit, what the message says)
REINTERPRETED = {
    "a window as long as the context": ("hf", _set("sliding_window", 131072), "sliding_window must be less than"),
    "an absurd window": ("original", _set("sliding_window", 10**9), "sliding_window must be less than"),
    "another model_type": ("hf", _set("model_type", "llama"), "model_type must be gpt_oss, not 'llama'"),
    "linear RoPE": ("hf", _rope("rope_type", "linear"), "rope_scaling.rope_type must be yarn"),
    "all layers full": ("hf", lambda data, layout: {**data, "layer_types": ["full_attention"] * 4},
                        "layer_types must be sliding_attention on even layers and full_attention on odd ones, one per "
                        "layer (the pattern ossrun runs); it differs at layer 0"),
    "too few layer_types": ("hf", lambda data, layout: {**data, "layer_types": data["layer_types"][:3]}, "differs at layer 3"),
    "absurd trained context": ("hf", _rope("original_max_position_embeddings", 10**30),
                               "rope_scaling.original_max_position_embeddings must be an integer in 1..131072"),
    "absurd initial context": ("original", _set("initial_context_length", 10**30), "initial_context_length must be at most"),
}


@pytest.mark.parametrize("case", list(REINTERPRETED))
def test_values_ossrun_would_reinterpret_are_refused_by_key(case, checkpoints, tmp_path):
    """They loaded and ran as gpt-oss's own values (linear RoPE as YaRN, any layer_types as the alternation), or the
    window was blamed on --kv-cache-gib."""
    layout, edit, expected = REINTERPRETED[case]
    _config(edit)(checkpoints[layout], tmp_path, layout)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path}/config.json: ") and expected in str(caught.value), caught.value


def test_logits_all_nan_end_generate_in_one_line(checkpoints, tmp_path):
    """They were sampled: greedy gave token 0 over and over ("!!!!!!"), exit 0 (hunt round 22 B-F4)."""
    _weights(_overflowing)(checkpoints["original"], tmp_path, "original")
    result = ossrun("generate", "--model", str(tmp_path), "--token-ids", "1,2,3", "--max-tokens", "3")
    _one_clear_line(result, "error: the model's logits are all NaN or infinite (broken weights?)")


@pytest.mark.parametrize("case, layout", CLI_CASES)
def test_a_broken_checkpoint_is_one_line_and_exit_2(case, layout, checkpoints, tmp_path):
    path, names = _broken(case, layout, checkpoints, tmp_path)
    _one_clear_line(ossrun("generate", "--model", str(path), "--token-ids", "1"), f"error: {names}")


def test_serve_says_the_same_in_one_line(checkpoints, tmp_path):
    path, names = _broken("more layers", "original", checkpoints, tmp_path)
    result = ossrun("serve", "--model", str(path), "--port", str(free_port()), "--data-dir", str(tmp_path / "data"))
    _one_clear_line(result, f"error: {names}")
