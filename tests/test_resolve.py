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
