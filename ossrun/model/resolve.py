"""Where a model named on the command line lives: a directory, the demo model, a preset, or a hub id.

`demo` (the default) is the tiny gpt-oss the project trained, expanded from the package's compact
weights (`demo_weights.py`); presets are random checkpoints the project writes itself (tests that
want noise, benchmarks); hub ids resolve to the real weights in the Hugging Face cache, which
`download` fills. None of them needs the network except `download`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from ossrun.model.checkpoint import original_specs, write_once, write_random_checkpoint
from ossrun.model.config import PRESETS
from ossrun.model.demo_weights import demo_dir, is_compact
from ossrun.paths import cache_dir

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
DEFAULT_MODEL = DEMO_MODEL
HUB_MODELS = ("openai/gpt-oss-20b", "openai/gpt-oss-120b")
# Only what the loader reads: the hub's original/ folder (config, weights, and its small dtypes/index files), which
# `detect_layout` prefers. Not the root HF shards, a second copy of the same weights (13.8 GB more for 20b, 65 GB for
# 120b: hunt round 22 B-F2), nor the metal/ build; the tokenizer ships in the package.
HUB_PATTERNS = ["original/*"]


class ModelNotFound(Exception):
    """A model name that resolves to no checkpoint; the message says what was looked for."""


class CacheUnwritable(Exception):
    """The cache cannot take the checkpoint a model name expands to on first use (a read-only home, a container's
    read-only root, `OSSRUN_CACHE_DIR` naming a file); the message says where and how to point it elsewhere."""


def _in_cache(what: str, make: Callable[[], Path]) -> Path:
    try:
        return make()
    except OSError as exc:
        raise CacheUnwritable(f"the {what} model is written to the cache on first use, and {cache_dir()} cannot take "
                              f"it ({exc.strerror or exc}); set OSSRUN_CACHE_DIR to a writable directory") from exc


def preset_dir(preset: str, seed: int = 0, layout: str = "original") -> Path:
    """The preset's checkpoint in the cache, written on first use. `20b` and `120b` are 13.8 and 65 GB of random
    weights under the real models' shapes and names, for benchmarks: the write was once silent (an info log), so
    `--model 20b`, read as gpt-oss-20b, filled the disk and served noise without a word (hunt round 18 A-F2). Now it
    says what it writes, and a disk without the room refuses it before the first byte."""
    if preset not in PRESETS:
        raise ModelNotFound(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    path = cache_dir() / "models" / f"{preset}-{layout}-seed{seed}"
    if not (path / "config.json").exists():
        size = sum(spec.nbytes for spec in original_specs(PRESETS[preset]))
        check_room(path, size, f"the {preset} preset")
        log.warning("writing the %s preset to %s: %s of random weights, for tests and benchmarks only", preset, path,
                    _gb(size))
        write_once(path, lambda out: write_random_checkpoint(PRESETS[preset], out, layout, seed))
    return path


def check_room(path: Path, size: int, what: str) -> None:
    """`CacheUnwritable` when the disk `path` goes to (its nearest existing folder's) has less than `size` bytes free:
    a checkpoint that does not fit would fill the disk, minutes in, before failing."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < size:
        raise CacheUnwritable(f"{what} is {_gb(size)} of random weights and {existing} has {_gb(free)} free; free "
                              "space or set OSSRUN_CACHE_DIR to a disk with room")


def _gb(size: int) -> str:
    value = size / 1e9
    return f"{value:.3g} GB" if value < 1000 else f"{value:,.0f} GB"


def preset_warning(spec: str | Path | None) -> str | None:
    """What a user who named a preset must know (said by `serve` at start and by `generate`): it answers noise under
    the real model's name. None for anything else."""
    if spec not in PRESETS:
        return None
    real = next((hub for hub in HUB_MODELS if hub.endswith(f"-{spec}")), HUB_MODELS[0])
    return (f"--model {spec} is a preset: random weights for tests and benchmarks, which answer noise (as "
            f"{PRESETS[spec].served_name}); for the real model run `ossrun download {real}`, then --model {real}")


def resolve_model(spec: str | Path | None) -> Path:
    """A checkpoint directory for `spec`: an existing path (a directory, or a compact demo file), `demo`, a preset name,
    or a hub id already downloaded."""
    if spec is None:
        spec = DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.exists():
        return _checkpoint_dir(path)
    spec = str(spec)
    if spec == DEMO_MODEL:
        return _in_cache("demo", lambda: demo_dir(cache_dir()))
    if spec in PRESETS:
        return _in_cache(f"{spec} preset", lambda: preset_dir(spec))
    if _looks_like_hub_id(spec):
        return _hub_snapshot(spec)
    if "/" in spec or spec.startswith((".", "~")):
        raise ModelNotFound(f"{spec}: no such directory")
    raise ModelNotFound(f"{spec!r} is neither a directory, {DEMO_MODEL!r}, a preset ({', '.join(PRESETS)}) nor a hub id")


def _hub_snapshot(repo_id: str) -> Path:
    """The snapshot of `repo_id`'s main revision in the Hugging Face cache, holding what `download` fetches; each
    other case says what is there and what to do (hunt round 22 B-F7: a pinned or cut-short download was met by
    advice that sent the operator the wrong way)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelNotFound(_not_downloaded(repo_id)) from None
    original = path / "original"
    if not (original / "config.json").is_file() or not any(f.is_file() for f in original.glob("*.safetensors")):
        raise ModelNotFound(f"{repo_id}: the download in {path} is incomplete (no original/ weights); run `ossrun "
                            f"download {repo_id}` again")
    return path


def _not_downloaded(repo_id: str) -> str:
    """Why `repo_id` has no main snapshot: never downloaded, or downloaded at a pinned revision (`download --revision`
    writes no refs/main, and `--model` takes no revision), whose snapshot directory is then the model to pass."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    found = sorted(str(p) for p in snapshots.glob("*") if p.is_dir())
    if not found:
        return f"{repo_id} is not downloaded; run `ossrun download {repo_id}` first"
    return (f"{repo_id} is downloaded only at a pinned revision (`ossrun download --revision`), which its id does not "
            f"name: pass the snapshot, --model {' or --model '.join(found)}")


def _looks_like_hub_id(spec: str) -> bool:
    """`owner/name` as the hub spells ids; a path (`/x`, `./x`, `a/b/c`) is not one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if spec.count("/") != 1 or spec.startswith((".", "~")):
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _checkpoint_dir(path: Path) -> Path:
    """An existing path that must be a checkpoint directory (either layout), or a compact demo file (`ossrun
    train-demo --out FILE`), expanded in the cache as the shipped one is."""
    if path.is_file() and is_compact(path):
        return _in_cache(f"demo weights file {path}'s", lambda: demo_dir(cache_dir(), path))
    if not path.is_dir():
        raise ModelNotFound(f"{path} is a file; --model takes a checkpoint directory (or a file `ossrun train-demo "
                            "--out` wrote)")
    if not (path / "config.json").exists() and not (path / "original" / "config.json").exists():
        raise ModelNotFound(f"{path}: no config.json and no original/config.json: not a gpt-oss checkpoint")
    return path


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch the real weights (the `original/` copy only) from the Hugging Face hub (progress bars are
    huggingface_hub's own)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
