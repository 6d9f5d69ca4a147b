"""From what an operator names with `--model` to the checkpoint served and the name it answers to: hub ids in the
Hugging Face cache (no network: the cache is built by hand, as huggingface_hub lays it out), what `ossrun download`
fetches, and the served name a checkpoint's config gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ossrun.model.checkpoint import read_config
from ossrun.model.config import PRESETS


def _write_config(root: Path, preset: str, layout: str, **extra: object) -> Path:
    """The config file of `preset` as the hub ships it (`original/config.json` or the root HF `config.json`)."""
    config = PRESETS[preset]
    folder = root / "original" if layout == "original" else root
    folder.mkdir(parents=True, exist_ok=True)
    data = config.to_original_json() if layout == "original" else config.to_hf_json()
    (folder / "config.json").write_text(json.dumps({**data, **extra}))
    return root


@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("preset, name", [("120b", "@cf/openai/gpt-oss-120b"), ("20b", "@cf/openai/gpt-oss-20b"),
                                          ("tiny", "@cf/openai/gpt-oss-20b"), ("small", "@cf/openai/gpt-oss-20b")])
def test_a_checkpoint_answers_to_the_name_of_its_shape(preset, name, layout, tmp_path):
    """Hunt round 22 B-F1: gpt-oss-120b's own config files (either layout) gave @cf/openai/gpt-oss-20b, so a 120b
    was served, listed and priced as the 20b, and `/ai/run/@cf/openai/gpt-oss-120b` was a 5007. The name follows the
    shape: 120b's layers and experts answer as the 120b, every other checkpoint as the 20b."""
    assert read_config(_write_config(tmp_path, preset, layout)).served_name == name


def test_a_served_name_key_in_the_config_renames_nothing(tmp_path):
    """The name was once read from an undocumented `served_name` key of original/config.json; it is derived only."""
    path = _write_config(tmp_path, "tiny", "original", served_name="@cf/meta/llama-3-8b-instruct")
    assert read_config(path).served_name == "@cf/openai/gpt-oss-20b"


# openai/gpt-oss-20b's files on the hub (its repository listing): both copies of the weights, the root HF shards and
# original/, plus the Metal build and the tokenizer files transformers reads.
GPT_OSS_20B_FILES = [
    ".gitattributes", "LICENSE", "README.md", "USAGE_POLICY", "chat_template.jinja", "config.json",
    "generation_config.json", "metal/model.bin", "model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "original/config.json", "original/dtypes.json",
    "original/model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
]


def test_download_fetches_the_one_copy_of_the_weights_the_loader_reads():
    """Hunt round 22 B-F2: `*.safetensors` matched the root shards and `original/*` the original copy (fnmatch's `*`
    crosses `/`), so `ossrun download` fetched 27.5 GB for the 13.8 GB the loader reads (it prefers original/).
    Filtered as huggingface_hub filters them, the patterns now keep original/ alone (the tokenizer ships in the
    package, so no tokenizer file is needed)."""
    from huggingface_hub.utils import filter_repo_objects

    from ossrun.model.resolve import HUB_PATTERNS

    fetched = set(filter_repo_objects(GPT_OSS_20B_FILES, allow_patterns=HUB_PATTERNS))
    assert fetched == {"original/config.json", "original/dtypes.json", "original/model.safetensors"}
