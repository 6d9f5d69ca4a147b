"""The training loop of the demo model: seeded, on the CPU, in minutes.

The loss is the full-vocabulary cross-entropy computed on the compact vocabulary: the exported
unembedding has zero rows for every token the data never uses, so at serve time those ~200k tokens
all have logit exactly 0. Training sees them as one extra column holding log(their count), the
log-sum-exp of 200k zeros, so a low loss means every wanted token beats all unused ones by a margin
and greedy decoding through the real model never picks an unused token.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ossrun.demo_model.conversations import Sample, generate
from ossrun.demo_model.trainable import TrainableGptOss
from ossrun.demo_model.vocab import UNK, Vocab
from ossrun.model.config import HARMONY_VOCAB_SIZE, ModelConfig

log = logging.getLogger(__name__)
IGNORE = -100

# gpt-oss at its smallest useful size: 4 layers alternating sliding/full attention with sinks, a
# 4-expert top-2 MoE, GQA 4:2, the full 201088-token harmony vocabulary (at export).
DEMO_CONFIG = ModelConfig(
    num_hidden_layers=4, num_experts=4, experts_per_token=2, hidden_size=64, intermediate_size=64,
    head_dim=16, num_attention_heads=4, num_key_value_heads=2,
)


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """The recipe of the shipped weights (`ossrun train-demo` with no options)."""

    seed: int = 0
    samples: int = 16000
    steps: int = 3600
    batch_size: int = 12
    lr: float = 4e-3
    warmup: int = 40
    weight_decay: float = 0.01


@dataclass(slots=True)
class TrainResult:
    model: TrainableGptOss
    vocab: Vocab
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _tensors(sample: Sample, vocab: Vocab) -> tuple[list[int], list[int]]:
    """Compact inputs and next-token targets; only the completion is learnt."""
    ids = vocab.compact(sample.prompt + sample.completion)
    targets = [IGNORE] * (len(sample.prompt) - 1) + ids[len(sample.prompt):] + [IGNORE]
    return ids, targets


def batches(samples: list[Sample], vocab: Vocab, batch_size: int, rng: random.Random):
    """Endless batches of similar lengths (sorted buckets, shuffled), right-padded with UNK."""
    encoded = sorted((_tensors(s, vocab) for s in samples), key=lambda pair: len(pair[0]))
    groups = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    while True:
        rng.shuffle(groups)
        for group in groups:
            width = max(len(ids) for ids, _ in group)
            ids = torch.tensor([i + [UNK] * (width - len(i)) for i, _ in group])
            targets = torch.tensor([t + [IGNORE] * (width - len(t)) for _, t in group])
            yield ids, targets


def full_vocab_loss(logits: torch.Tensor, targets: torch.Tensor, n_unused: int) -> torch.Tensor:
    """Cross-entropy as if over the full vocabulary, where the n_unused absent tokens have logit 0."""
    logits = logits.reshape(-1, logits.shape[-1])
    logits = torch.cat([logits[:, 1:], logits.new_full((logits.shape[0], 1), math.log(n_unused))], dim=-1)  # drop UNK
    targets = targets.reshape(-1)
    return F.cross_entropy(logits, torch.where(targets == IGNORE, IGNORE, targets - 1), ignore_index=IGNORE)


def _lr(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(config: ModelConfig, settings: TrainSettings, samples: list[Sample] | None = None,
          on_step: Callable[[int, TrainResult], None] | None = None) -> TrainResult:
    """Train from scratch; the same settings give the same weights (one thread order aside)."""
    torch.manual_seed(settings.seed)
    samples = samples if samples is not None else generate(settings.samples, settings.seed)
    vocab = Vocab.from_samples(samples)
    model = TrainableGptOss(config, len(vocab), settings.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "embedding"]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2 or n == "embedding"]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98))
    n_unused = HARMONY_VOCAB_SIZE - (len(vocab) - 1)
    result = TrainResult(model, vocab)
    start = time.perf_counter()
    stream = batches(samples, vocab, settings.batch_size, random.Random(settings.seed))
    for step in range(settings.steps):
        ids, targets = next(stream)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, settings)
        loss = full_vocab_loss(model(ids), targets, n_unused)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        result.losses.append(loss.item())
        if on_step is not None:
            on_step(step, result)
        if step % 50 == 0 or step == settings.steps - 1:
            log.info("step %d/%d loss %.4f (%.0f s)", step, settings.steps, loss.item(), time.perf_counter() - start)
    result.seconds = time.perf_counter() - start
    return result
