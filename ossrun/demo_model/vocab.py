"""The reduced vocabulary the demo model is trained on: only the token ids its conversations use.

Index 0 is UNK: every token the model does not know reads as the same learnt embedding (exported
into every unused row of the full embedding), so an unseen word in a question looks like "something
outside my world" rather than like an untrained random vector. UNK is never an output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ossrun.demo_model.conversations import Sample

UNK = 0


@dataclass(frozen=True, slots=True)
class Vocab:
    token_ids: tuple[int, ...]  # compact index i + 1 ↔ token id token_ids[i]

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> "Vocab":
        """Every token of in-world conversations, and of every answer (out-of-world prompts' words stay UNK)."""
        known: set[int] = set()
        for sample in samples:
            known.update(sample.completion)
            if not sample.unknown:
                known.update(sample.prompt)
        return cls(tuple(sorted(known)))

    def __len__(self) -> int:
        """Rows of the compact embedding: UNK and the known tokens."""
        return len(self.token_ids) + 1

    def compact(self, ids: list[int]) -> list[int]:
        index = {t: i + 1 for i, t in enumerate(self.token_ids)}
        return [index.get(t, UNK) for t in ids]

    def ids_tensor(self) -> torch.Tensor:
        return torch.tensor(self.token_ids, dtype=torch.long)
