"""Adapters the engine can serve: registered by name, loaded on demand, evicted LRU under a byte budget.

Each registration is a new *version* of its name, with a key of its own (`name#n`). A request is pinned to the
version current when it is added and keeps it to its last token; the key salts its prefix-cache blocks, so a
re-registered adapter (a fine-tune's new upload) never reuses KV computed with the old weights. A version that
requests still hold is never evicted (its files may be gone), and it is dropped when its last request ends.
Adapters needed by the current step are pinned too, so eviction never pulls weights from under a running batch.
A *resident* adapter (a `--lora` one, in the operator's folder, which may change while the server runs) is read once
and never evicted: read again, it could come back with other weights under the same version.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from ossrun.engine.errors import UnknownAdapterError
from ossrun.model.config import ModelConfig
from ossrun.model.lora import LoraAdapter, load_peft_adapter

log = logging.getLogger(__name__)


class AdapterRegistry:
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, budget_bytes: int = 512 * 1024**2):
        self.config = config
        self.dtype = dtype
        self.device = device
        self.budget_bytes = budget_bytes
        self._current: dict[str, str] = {}  # name → the key of its current version
        self._paths: dict[str, Path] = {}  # key → where it is (re)loaded from: current versions only
        self._resident: set[str] = set()  # keys never evicted (nor read again)
        self._loaded: OrderedDict[str, LoraAdapter] = OrderedDict()  # key → weights, least recently used first
        self._users: Counter[str] = Counter()  # key → requests pinned to it
        self._versions = itertools.count(1)
        self._lock = threading.Lock()  # registration comes from the server's threads, use from the engine's

    def register(self, name: str, path: str | Path, install: Callable[[], Path] | None = None,
                 resident: bool = False) -> LoraAdapter:
        """Make the adapter at `path` the current version of `name`; it is loaded (and so checked) now. Raises
        AdapterError. `install`, called once it is accepted, moves the files to where they stay and returns that
        folder (a fine-tune's upload, checked where it was staged): no reload can run between the move and the switch.
        `resident`: kept in memory until replaced, its files never read again (they are not the server's to keep)."""
        adapter = load_peft_adapter(path, self.config, name, self.dtype, self.device)
        with self._lock:
            old = self._current.get(name)
            if old is not None and self._users[old] and old not in self._loaded:
                # its files are about to change, and requests still run on it: keep the old weights in memory
                self._loaded[old] = load_peft_adapter(self._paths[old], self.config, name, self.dtype, self.device)
            home = Path(install()) if install is not None else Path(path)
            key = f"{name}#{next(self._versions)}"
            self._current[name], self._paths[key], self._loaded[key] = key, home, adapter
            if resident:
                self._resident.add(key)
            if old is not None:
                self._paths.pop(old, None)
                self._resident.discard(old)
                self._drop_if_unused(old)
            self._evict(pinned={key})
        return adapter

    def known(self, name: str) -> bool:
        with self._lock:
            return name in self._current

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    @property
    def loaded_names(self) -> list[str]:
        """Names whose current version is in memory, least recently used first."""
        with self._lock:
            current = {key: name for name, key in self._current.items()}
            return [current[key] for key in self._loaded if key in current]

    def acquire(self, name: str) -> str:
        """Pin a new request to `name`'s current version → its key (the request's adapter from now on)."""
        with self._lock:
            key = self._current.get(name)
            if key is None:
                raise UnknownAdapterError(name)
            self._users[key] += 1
            return key

    def release(self, key: str) -> None:
        """A request pinned to `key` has ended."""
        with self._lock:
            self._users[key] -= 1
            if self._users[key] <= 0:
                del self._users[key]
                self._drop_if_unused(key)

    def get_many(self, keys: set[str]) -> dict[str, LoraAdapter]:
        """The adapter versions a step needs (by key), loading any that were evicted, then evicting others over budget."""
        with self._lock:
            result = {}
            for key in keys:
                if key not in self._loaded:
                    if key not in self._paths:
                        raise UnknownAdapterError(key)
                    log.info("loading adapter %s", key)
                    self._loaded[key] = load_peft_adapter(self._paths[key], self.config, key.rpartition("#")[0],
                                                          self.dtype, self.device)
                self._loaded.move_to_end(key)
                result[key] = self._loaded[key]
            self._evict(pinned=keys)
            return result

    def _drop_if_unused(self, key: str) -> None:
        """A replaced version goes once no request holds it."""
        if key not in self._paths and not self._users[key]:
            self._users.pop(key, None)
            self._loaded.pop(key, None)

    def _evict(self, pinned: set[str]) -> None:
        """Over budget: drop least recently used current versions no step needs and that are not resident (a replaced
        version cannot be reloaded, so it stays until its requests end)."""
        total = sum(a.nbytes for a in self._loaded.values())
        for key in list(self._loaded):
            if total <= self.budget_bytes:
                break
            if key not in pinned and key in self._paths and key not in self._resident:
                total -= self._loaded.pop(key).nbytes
