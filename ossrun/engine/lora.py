"""Adapters the engine can serve: registered by name, loaded on demand, evicted LRU under a byte budget.

Adapters needed by the current step are pinned, so eviction never pulls weights from under a running batch.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
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
        self._paths: dict[str, Path] = {}
        self._loaded: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._lock = threading.Lock()  # registration comes from the server's threads, use from the engine's

    def register(self, name: str, path: str | Path) -> LoraAdapter:
        """Make an adapter servable under `name`; it is loaded (and so checked) now. Raises AdapterError."""
        adapter = load_peft_adapter(path, self.config, name, self.dtype, self.device)
        with self._lock:
            self._paths[name] = Path(path)
            self._loaded[name] = adapter
            self._loaded.move_to_end(name)
            self._evict(pinned={name})
        return adapter

    def known(self, name: str) -> bool:
        with self._lock:
            return name in self._paths

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    @property
    def loaded_names(self) -> list[str]:
        return list(self._loaded)

    def get_many(self, names: set[str]) -> dict[str, LoraAdapter]:
        """The adapters a step needs, loading any that were evicted, then evicting others over budget."""
        with self._lock:
            missing = [n for n in names if n not in self._paths]
            if missing:
                raise UnknownAdapterError(missing[0])
            result = {}
            for name in names:
                if name not in self._loaded:
                    log.info("loading adapter %s", name)
                    self._loaded[name] = load_peft_adapter(self._paths[name], self.config, name, self.dtype, self.device)
                self._loaded.move_to_end(name)
                result[name] = self._loaded[name]
            self._evict(pinned=names)
            return result

    def _evict(self, pinned: set[str]) -> None:
        total = sum(a.nbytes for a in self._loaded.values())
        for name in list(self._loaded):
            if total <= self.budget_bytes:
                break
            if name not in pinned:
                total -= self._loaded.pop(name).nbytes
