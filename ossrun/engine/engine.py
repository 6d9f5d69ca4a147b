"""The synchronous engine: one loop owns the model, the KV cache and every running request.

`step()` is schedule → run → postprocess. Everything else (the async front, the batch queue,
the server) talks to it through `add`, `abort` and the events `step` returns.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ossrun.engine.errors import CacheTooSmallError, ContextLengthError, UnknownAdapterError
from ossrun.engine.kv_cache import KVCacheManager
from ossrun.engine.lora import AdapterRegistry
from ossrun.engine.request import Request, TokenEvent
from ossrun.engine.runner import ModelRunner
from ossrun.engine.sampler import Sampler
from ossrun.engine.scheduler import Scheduler
from ossrun.engine.sequence import Sequence, Status
from ossrun.model.config import MAX_CONTEXT, ModelConfig
from ossrun.model.gpt_oss import GptOss

log = logging.getLogger(__name__)

SERVED_CONTEXT = 128000  # what the hosted API serves of the model's 131072


@dataclass(frozen=True, slots=True)
class EngineOptions:
    block_size: int = 16
    max_num_seqs: int = 64
    max_tokens_per_step: int = 512
    kv_cache_bytes: int = 2 * 1024**3
    kv_dtype: torch.dtype = torch.bfloat16
    prefix_caching: bool = True
    max_model_len: int = SERVED_CONTEXT
    seed: int | None = None
    adapter_budget_bytes: int = 512 * 1024**2
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (CUDA with the Triton kernels only)


def _layer_block_bytes(c: ModelConfig, options: EngineOptions) -> tuple[int, int, int]:
    """(bytes of one layer's K and V for a block, sliding layers, full layers)."""
    item = torch.empty((), dtype=options.kv_dtype).element_size()
    n_sliding_layers = sum(c.is_sliding(i) for i in range(c.num_hidden_layers))
    return 2 * options.block_size * c.num_key_value_heads * c.head_dim * item, n_sliding_layers, c.num_hidden_layers - n_sliding_layers


def planned_cache_bytes(c: ModelConfig, options: EngineOptions) -> int:
    """What the pools `plan_blocks` sizes take: allocated whole at start (the server checks it fits before loading)."""
    full, sliding = plan_blocks(c, options)
    per_layer_block, n_sliding_layers, n_full_layers = _layer_block_bytes(c, options)
    return per_layer_block * (full * n_full_layers + sliding * n_sliding_layers)


def plan_blocks(c: ModelConfig, options: EngineOptions) -> tuple[int, int]:
    """Split the KV budget into (full, sliding) pool sizes.

    The sliding pool needs only the window (plus the block being filled) for every running
    sequence and one step's worth of prefill; everything else goes to the full-attention layers.
    """
    bs = options.block_size
    per_layer_block, n_sliding_layers, n_full_layers = _layer_block_bytes(c, options)
    sliding = options.max_num_seqs * (c.sliding_window // bs + 2) + options.max_tokens_per_step // bs + 2
    remaining = options.kv_cache_bytes - sliding * per_layer_block * n_sliding_layers
    full = remaining // max(1, per_layer_block * n_full_layers)
    full = min(full, options.max_num_seqs * (-(-options.max_model_len // bs)) + 1)
    least = 2 + options.max_tokens_per_step // bs
    if full < least:
        needed = sliding * per_layer_block * n_sliding_layers + least * per_layer_block * n_full_layers
        raise CacheTooSmallError(f"a KV cache of {options.kv_cache_bytes / 2**30:.3g} GiB is too small for this model "
                                 f"and these options: it needs at least {needed / 2**30:.3g} GiB "
                                 f"(fewer concurrent sequences need less)")
    return int(full), int(sliding)


class Engine:
    def __init__(self, model: GptOss, options: EngineOptions = EngineOptions(), decode_token: Callable[[int], bytes] | None = None):
        self.model = model
        self.options = options
        full, sliding = plan_blocks(model.config, options)
        self.kv = KVCacheManager(full, sliding, options.block_size, model.config.sliding_window, options.prefix_caching)
        # The served context is what one sequence can hold: a longer request could never be scheduled.
        self.kv_tokens = self.kv.full.capacity * options.block_size
        asked = min(options.max_model_len, MAX_CONTEXT)
        if options.max_model_len > MAX_CONTEXT:
            log.warning("the model's context is %d tokens: requests get at most that, not %d", MAX_CONTEXT, options.max_model_len)
        self.max_model_len = min(asked, self.kv_tokens)
        if self.max_model_len < asked:
            log.warning("the KV cache holds %d tokens: requests get a context of %d tokens, not %d "
                        "(more KV cache memory raises it)", self.kv_tokens, self.max_model_len, asked)
        self.scheduler = Scheduler(self.kv, options.max_num_seqs, options.max_tokens_per_step)
        self.adapters = AdapterRegistry(model.config, model.adapter_dtype, model.device, options.adapter_budget_bytes)
        self.runner = ModelRunner(model, self.kv, options.kv_dtype, Sampler(options.seed), self.adapters, options.cuda_graphs,
                                  options.max_num_seqs, self.max_model_len)
        self.decode_token = decode_token
        self.sequences: dict[str, Sequence] = {}
        self._aborted: list[str] = []
        self.generated_tokens = 0
        log.info("KV cache: %d full blocks, %d sliding blocks of %d tokens", full, sliding, options.block_size)

    # -- requests ---------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        prompt = len(request.prompt_token_ids)
        if prompt == 0:
            raise ValueError("the prompt has no tokens")
        if prompt + request.params.max_tokens > self.max_model_len:
            raise ContextLengthError(prompt, request.params.max_tokens, self.max_model_len)
        if request.lora is not None and not self.adapters.known(request.lora):
            raise UnknownAdapterError(request.lora)
        vocab = self.model.config.vocab_size
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        bad = [t for t, _ in request.params.logit_bias if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")

    def add(self, request: Request) -> None:
        self.validate(request)
        if request.request_id in self.sequences:
            raise ValueError(f"request id {request.request_id} is already running")
        seq = Sequence.from_request(request)
        if request.lora is not None:  # pinned now: a re-registered adapter never switches it mid-answer
            seq.adapter = self.adapters.acquire(request.lora)
        self.sequences[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed at the start of the next step."""
        self._aborted.append(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.sequences) or bool(self._aborted)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        events = self._reap_aborted()
        step = self.scheduler.schedule()
        for seq in step.unfit:
            self._forget(seq)
            seq.status = Status.FINISHED
            events.append(self._event(seq, None, finish_reason="error",
                                      error=f"{len(seq.tokens)} tokens do not fit the KV cache ({self.kv_tokens} tokens)"))
        if not step.scheduled:
            return events
        sampled, output = self.runner.run(step.scheduled)
        for item in step.scheduled:  # before postprocessing: a request that ends now frees its blocks, hashed
            seq = item.seq
            seq.num_computed += item.num_new_tokens
            written = self.kv.commit(seq.blocks, seq.tokens, seq.num_computed, seq.adapter, seq.num_prompt_tokens)
            # A prompt evicted while preempted is written again: still at most what was not served from the cache.
            seq.num_cache_write_tokens = min(seq.num_cache_write_tokens + written, seq.num_prompt_tokens - seq.num_cached_tokens)
        for i, item in enumerate(sampled):
            try:
                events.append(self._postprocess(item.seq, output, i))
            except Exception as exc:  # this request ends with the error; the others keep going
                item.seq.error = f"postprocessing failed: {exc}"
                events.append(self._postprocess(item.seq, output, i))
        return events

    def _reap_aborted(self, finish_reason: str = "abort", error: str | None = None) -> list[TokenEvent]:
        events = []
        for request_id in self._aborted:
            seq = self.sequences.get(request_id)
            if seq is not None:
                self._forget(seq)
                self.scheduler.remove(seq)
                events.append(self._event(seq, None, finish_reason=finish_reason, error=error))
        self._aborted.clear()
        return events

    def abort_all(self, finish_reason: str = "abort", error: str | None = None) -> list[TokenEvent]:
        """End every request now (after a failed step the cache state is not trusted) → their last events."""
        self._aborted.extend(self.sequences)
        events = self._reap_aborted(finish_reason, error)
        self.scheduler.waiting.clear()
        self.scheduler.running.clear()
        return events

    def _postprocess(self, seq: Sequence, output, i: int) -> TokenEvent:
        if seq.error is not None:
            self._forget(seq)
            self.scheduler.remove(seq)
            return self._event(seq, None, finish_reason="error", error=seq.error)
        token = output.token_ids[i]
        seq.append(token)
        self._advance_constraint(seq, token)
        self.generated_tokens += 1
        finish, stop_reason = self._check_stop(seq, token)
        if finish == "stop" and getattr(seq.request.constraint, "cut", False):
            finish = "length"  # it ended valid, but its budget guard refused the model's tokens: max_tokens shaped it
        event = self._event(seq, token, output.logprobs[i], output.top_logprobs[i], finish, stop_reason)
        if finish:
            self._forget(seq)
            self.scheduler.remove(seq)
        return event

    def _forget(self, seq: Sequence) -> None:
        """The request has ended: it leaves the engine's table and lets go of its adapter version."""
        del self.sequences[seq.request_id]
        if seq.adapter is not None:
            self.adapters.release(seq.adapter)

    @staticmethod
    def _advance_constraint(seq: Sequence, token: int) -> None:
        """Tell the request's grammar what was sampled (it then prepares the next mask in the background)."""
        constraint = seq.request.constraint
        if constraint is not None and seq.error is None:
            try:
                constraint.advance(token)
            except Exception as exc:  # the request ends with an error; the batch goes on
                seq.error = f"structured output failed: {exc}"

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, int | str | None]:
        params = seq.request.params
        if token in params.stop_token_ids:
            return "stop", token
        if getattr(seq.request.constraint, "is_finished", False):  # the grammar is complete: nothing more may follow
            return "stop", token
        if params.stop and self.decode_token is not None:
            matched = self._match_stop_string(seq, token)
            if matched is not None:
                return "stop", matched
        if seq.num_output >= params.max_tokens or len(seq.tokens) >= self.max_model_len:
            return "length", None
        return None, None

    def _match_stop_string(self, seq: Sequence, token: int) -> str | None:
        """Decode incrementally (a token may end mid-character) and look for a stop string in the tail."""
        if seq.text_decoder is None:
            seq.text_decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = seq.text_decoder.decode(self.decode_token(token))
        longest = max(len(s) for s in seq.request.params.stop)
        seq.text_tail = (seq.text_tail + text)[-(longest + len(text)):]
        for stop in seq.request.params.stop:
            if stop in seq.text_tail:
                return stop
        return None

    def _event(self, seq, token, logprob=None, top=(), finish_reason=None, stop_reason=None, error=None) -> TokenEvent:
        return TokenEvent(
            request_id=seq.request_id,
            token_id=token,
            logprob=logprob,
            top_logprobs=tuple(top or ()),
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_cache_write_tokens=seq.num_cache_write_tokens,
            num_output_tokens=seq.num_output,
            error=error,
        )

    # -- offline use --------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> dict[str, list[TokenEvent]]:
        """Run requests to completion (CLI, tests, benchmarks) → each request's events in order."""
        results: dict[str, list[TokenEvent]] = {}
        for request in requests:
            self.add(request)
            results[request.request_id] = []
        while self.has_work:
            for event in self.step():
                results[event.request_id].append(event)
        return results

    def stats(self) -> dict[str, int]:
        running_requests, waiting_requests = self.scheduler.requests()
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "running_requests": running_requests,
            "waiting_requests": waiting_requests,
            "kv_blocks_used": self.kv.full.num_used,
            "kv_blocks_total": self.kv.full.num_blocks - 1,
            "kv_sliding_blocks_used": self.kv.sliding.num_used,
            "generated_tokens_total": self.generated_tokens,
            "preemptions_total": self.scheduler.preemptions,
        }
