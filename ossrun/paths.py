"""Where ossrun keeps files: a cache (rebuildable: preset models, tokenizer data, compiled kernels)
and a data directory (what must survive: batch queue, fine-tunes)."""

from __future__ import annotations

import os
from pathlib import Path


def _user_dir(kind: str) -> Path:
    """platformdirs' per-user folder, imported only when asked: the model and engine must import on
    minimal images without it (the lent GPU machines); there the XDG defaults stand in."""
    try:
        import platformdirs
    except ImportError:
        return Path.home() / (".cache" if kind == "cache" else ".local/share") / "ossrun"
    return Path(platformdirs.user_cache_dir("ossrun") if kind == "cache" else platformdirs.user_data_dir("ossrun"))


def cache_dir() -> Path:
    return Path(os.environ.get("OSSRUN_CACHE_DIR") or _user_dir("cache"))


def data_dir() -> Path:
    return Path(os.environ.get("OSSRUN_DATA_DIR") or _user_dir("data"))
