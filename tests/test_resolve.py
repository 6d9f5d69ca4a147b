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


SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache that resolve_model looks in, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _snapshot(cache: Path, repo_id: str, source: Path, *, main: bool = True, original: bool = True) -> Path:
    """A snapshot as huggingface_hub writes it: files in blobs/, linked from snapshots/SHA, refs/main naming SHA
    (`download --revision SHA` writes no refs/main). `source` is a checkpoint in the original layout, linked under
    original/ (`original=False`: its config alone, as a download cut before original/model.safetensors leaves it)
    and at the root, where the hub's HF copy lies."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    (snapshot / "original").mkdir(parents=True)
    (repo / "blobs").mkdir()
    files = {"config.json": source / "config.json", "model.safetensors": source / "model.safetensors",
             "original/config.json": source / "config.json"}
    if original:
        files["original/model.safetensors"] = source / "model.safetensors"
    for i, (name, file) in enumerate(files.items()):
        blob = repo / "blobs" / f"blob{i}"
        blob.symlink_to(file)
        (snapshot / name).symlink_to(blob)
    if main:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(SHA)
    return snapshot


def test_a_downloaded_hub_id_is_its_snapshot(hub_cache, checkpoints):
    from ossrun.model.resolve import resolve_model

    snapshot = _snapshot(hub_cache, "openai/gpt-oss-20b", checkpoints["original"])
    assert resolve_model("openai/gpt-oss-20b") == snapshot


def test_a_snapshot_of_a_pinned_revision_is_named_to_pass_as_model(hub_cache, checkpoints):
    """Hunt round 22 B-F7 (a): `ossrun download ID --revision SHA` writes no refs/main, and `--model ID` said "not
    downloaded; run `ossrun download`", another 65 GB for the 120b. It names the snapshot that is there instead."""
    from ossrun.model.resolve import ModelNotFound, resolve_model

    snapshot = _snapshot(hub_cache, "openai/gpt-oss-120b", checkpoints["original"], main=False)
    with pytest.raises(ModelNotFound) as caught:
        resolve_model("openai/gpt-oss-120b")
    assert str(caught.value) == (f"openai/gpt-oss-120b is downloaded only at a pinned revision (`ossrun download "
                                 f"--revision`), which its id does not name: pass the snapshot, --model {snapshot}")
    assert resolve_model(snapshot) == snapshot


def test_a_hub_id_never_downloaded_says_to_download_it(hub_cache):
    from ossrun.model.resolve import ModelNotFound, resolve_model

    with pytest.raises(ModelNotFound, match=r"^openai/gpt-oss-20b is not downloaded; run `ossrun download "
                                            r"openai/gpt-oss-20b` first$"):
        resolve_model("openai/gpt-oss-20b")


def test_a_download_without_its_original_weights_says_to_download_again(hub_cache, checkpoints):
    """Hunt round 22 B-F7 (b): a download cut before original/model.safetensors (or one of the root files alone) was
    refused as "…/original: no .safetensors files", which said nothing of what to do."""
    from ossrun.model.resolve import ModelNotFound, resolve_model

    snapshot = _snapshot(hub_cache, "openai/gpt-oss-20b", checkpoints["original"], original=False)
    with pytest.raises(ModelNotFound) as caught:
        resolve_model("openai/gpt-oss-20b")
    assert str(caught.value) == (f"openai/gpt-oss-20b: the download in {snapshot} is incomplete (no original/ "
                                 "weights); run `ossrun download openai/gpt-oss-20b` again")
