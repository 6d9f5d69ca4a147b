"""Where ossrun keeps files: a cache (rebuildable: preset models, tokenizer data, compiled kernels)
and a data directory (what must survive: batch queue, fine-tunes)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    return Path(os.environ.get("OSSRUN_CACHE_DIR") or platformdirs.user_cache_dir("ossrun"))


def data_dir() -> Path:
    return Path(os.environ.get("OSSRUN_DATA_DIR") or platformdirs.user_data_dir("ossrun"))
