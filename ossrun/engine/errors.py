"""Errors the engine raises to its callers, with the numbers a client needs to fix the request."""

from __future__ import annotations


class ContextLengthError(ValueError):
    """prompt + max_tokens does not fit the served context window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.limit = limit
        super().__init__(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {prompt_tokens + max_tokens} "
            f"exceeds the context window of {limit} tokens"
        )


class CacheTooSmallError(ValueError):
    """The KV-cache budget cannot hold one step of this model; the message says how much it needs."""


class UnknownAdapterError(ValueError):
    """A request names a LoRA adapter the server does not have."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"unknown LoRA adapter {name!r}")


class ShuttingDownError(RuntimeError):
    """The engine is draining for shutdown: it ended this request (or takes no new ones)."""


class AdapterLoadError(ValueError):
    """A LoRA adapter that cannot be served (wrong modules, rank, shapes); the message says why."""


class AdapterPairMismatchError(AdapterLoadError):
    """Each of the adapter's two files is valid alone, but they disagree (the config's `r` is not the tensors' rank, or
    it targets other projections than the tensors adapt): one of them belongs to another pair (a fine-tune changing
    rank or target modules has replaced one file so far)."""
