"""From a parsed request (`ask.Ask`) to engine work and back: the one path every route shares.

`plan` renders the typed conversation (harmony) and maps the request's fields onto `SamplingParams`
and a grammar; `run` streams the engine's tokens through the harmony parser and yields `Step`s, each
with the parser's events for that token; `account` and `Outcome.add` fold them. The surfaces
(`surfaces/`) turn the same folding into a stream or a sync answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ossrun import harmony
from ossrun.api.ask import Ask
from ossrun.api.conversations import ResponseStore
from ossrun.api.schemas import OPENAI_DEFAULTS, WORKERS_AI_DEFAULTS
from ossrun.api.stops import StopStrings
from ossrun.api.errors import SHUTTING_DOWN, ApiError, bad_input, context_too_long, storage_refused, unknown_lora
from ossrun.engine.client import (
    AdapterLoadError,
    AdapterPairMismatchError,
    BudgetTooSmall,
    ContextLengthError,
    EngineClient,
    Grammar,
    GrammarError,
    Priority,
    SamplingParams,
    ShuttingDownError,
    Submission,
    TokenEvent,
    UnknownAdapterError,
)
from ossrun.finetunes import PairMismatch
from ossrun.harmony import grammar as harmony_grammar
from ossrun.harmony.shapes import WrappedTool, tool_spec
from ossrun.storage import DATABASE, StorageHealth, write_refusal

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class Plan:
    shape: str  # prompt | messages | responses | completions
    ask: Ask
    prompt_ids: list[int]
    params: SamplingParams
    lora: str | None = None
    forced_tool: str | None = None
    raw: bool = False
    stream: bool = False
    priority: Priority = Priority.INTERACTIVE
    grammar: Grammar | None = None  # what the output must follow (the engine compiles it)
    stop: tuple[str, ...] = ()  # stop strings: matched on the answer text here, not by the engine
    json_mode: bool = False  # response_format / text.format asks for JSON: the Prompt result parses it
    group: str | None = None  # the HTTP request its choice belongs to: the engine shares its slots fairly between groups
    client: str | None = None  # who sent it (`access.client_address`): the engine shares itself between clients first


@dataclass(slots=True)
class Step:
    token: TokenEvent
    events: list[Any]
    unshown: int = 0  # characters of answer text parsed so far that stop strings hold back or cut off
    hidden: bool = False  # the token's text is never answer text (a harmony special in chat, a stop token in completions)
    reasoning: int = 0  # tokens of reasoning messages' text this step adds (this one, or a header's read as reasoning)
    salvaged: int | None = None  # a header was read as answer text: only its last `salvaged` tokens are wholly in it
    in_header: bool = False  # the token went into a header that is still open (its earlier tokens may yet be answer)


@dataclass(slots=True)
class Outcome:
    """Everything a request produced, folded from its steps as they come (`Service.account` for the
    counters, `add` for the parsed events): what sync results and streams are both built from."""

    reasoning: str = ""
    content: str = ""  # the answer (on /v1/completions: every generated token's text)
    tool_calls: list[harmony.ParsedToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    stop_reason: str | None = None  # the stop string that ended the answer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # Responses' input_tokens_details (the current openai SDK requires it there)
    reasoning_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)  # tokens whose text the parser still holds
    held_logprobs: list[dict[str, Any]] = field(default_factory=list)  # tokens of a message's text stop strings hold
    anomalies: list[str] = field(default_factory=list)

    def add(self, event: harmony.Event) -> None:
        """Fold one parsed event in (as `harmony.fold_events` does for a whole list)."""
        if isinstance(event, harmony.ReasoningDelta):
            self.reasoning += event.text
        elif isinstance(event, harmony.ContentDelta):
            self.content += event.text
        elif isinstance(event, harmony.ToolCallStart):
            self.tool_calls.append(harmony.ParsedToolCall(event.call_id, event.name))
        elif isinstance(event, harmony.ToolCallArgumentsDelta) and event.index < len(self.tool_calls):
            self.tool_calls[event.index].arguments += event.text
        elif isinstance(event, harmony.Finished):
            self.finish_reason = event.reason


def _max_tokens(ask: Ask, defaults: dict[str, Any], room: int) -> int:
    """The request's own limit, else the surface's default, but never more than the context has left."""
    if ask.max_tokens is not None:
        return ask.max_tokens
    return max(1, min(defaults["max_tokens"], room))


def _answer_room(ask: Ask, defaults: dict[str, Any], window: int) -> int:
    """The room `truncation: "auto"` keeps for the answer: `max_output_tokens`, else the surface's default limit (what
    `_max_tokens` gives an answer when the context has room for it) but at most half the window, so that on a small
    window the conversation keeps some history. Not just one token, though the prompt alone may leave the answer no
    more: a conversation kept at the window's edge would get answers a token or two long, turn after turn."""
    if ask.max_tokens is not None:
        return ask.max_tokens
    return min(defaults["max_tokens"], window // 2)


def _dropping(ask: Ask, units: Sequence[tuple[int, ...]]) -> Ask:
    """The ask without the items at the indices of `units` (`harmony.droppable_items`), `stored_items` counted again."""
    dropped = {index for unit in units for index in unit}
    items = [item for index, item in enumerate(ask.items) if index not in dropped]
    return dataclasses.replace(ask, items=items, stored_items=ask.stored_items - sum(index < ask.stored_items for index in dropped))


def _guess(items: Sequence[Any], units: Sequence[tuple[int, ...]], excess: int, prompt: int) -> int:
    """How many `units` to drop so that `excess` of the `prompt`'s tokens go, counting each item's share of the prompt
    by the length of its JSON."""
    lengths = [len(item.model_dump_json()) for item in items]
    per_char, dropped = prompt / max(1, sum(lengths)), 0.0
    for count, unit in enumerate(units, 1):
        dropped += per_char * sum(lengths[index] for index in unit)
        if dropped >= excess:
            return count
    return len(units)


def _fewest(fits: Callable[[int], bool], total: int, guess: int) -> int:
    """The fewest of 1..`total` that `fits` (monotone; 0 does not fit), or `total` when none does: steps doubling away
    from `guess` until the answer is bracketed, then bisection; `fits` is asked about each count once at most."""
    if fits(guess):
        low, high, step = guess - 1, guess, 1
        while low > 0 and fits(low):
            high, step = low, step * 2
            low = max(0, high - step)
    elif guess == total:
        return total
    else:
        low, high, step = guess, guess + 1, 1
        while not fits(high):
            if high == total:
                return total
            low, step = high, step * 2
            high = min(total, low + step)
    while high - low > 1:  # `low` does not fit, `high` does
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _callable(ask: Ask, tool_names: tuple[str, ...]) -> tuple[str, ...]:
    """The tools the answer may call: those `allowed_tools` lists (each one of `tools`, or a 400 naming it), else all."""
    if ask.allowed is None:
        return tool_names
    for name in ask.allowed:
        if name not in tool_names:
            raise bad_input(f"Error: at '/tool_choice': allowed_tools names {name!r}, which is not in 'tools'", "tool_choice")
    return ask.allowed


def _named_tool(ask: Ask, tool_names: tuple[str, ...]) -> str | None:
    """The one function the answer must call: a named `tool_choice`, or `required` with a single tool it may call."""
    if ask.named_tool is not None:
        return ask.named_tool
    callable_names = _callable(ask, tool_names)
    if ask.tool_choice == "required":
        if not callable_names:
            raise bad_input("Error: at '/tool_choice': 'required' needs at least one tool in 'tools'", "tool_choice")
        return callable_names[0] if len(callable_names) == 1 else None
    return None


def _schema_field(ask: Ask, label: str | None) -> str | None:
    """The field of the schema a grammar labels `label` (`GrammarError.schema`): the answer's format or a tool's
    parameters, as the request spelled it; None when no schema is to blame."""
    if label is None:
        return None
    if label == harmony_grammar.schema_label(None):
        return ask.format_name
    return next((ask.parameters_name(spec.name) for spec in map(tool_spec, ask.tools)
                 if harmony_grammar.schema_label(spec.name) == label), None)


def _converted(ask: Ask) -> harmony.Converted:
    if ask.messages is not None:
        return harmony.convert_chat(ask.messages)
    if ask.items is not None:
        return harmony.convert_responses(ask.items, ask.instructions, ask.stored_items)
    return harmony.convert_prompt(ask.prompt)


# A schema longer than this (as compact JSON) is not stated to the model: a 5000-property object would add ~60k
# prompt tokens to every request. The grammar holds the answer to it either way.
MAX_STATED_SCHEMA_CHARS = 32_000
# The most characters a JSON format may take as the developer message would state it (name, description, schema).
# Past MAX_STATED_SCHEMA_CHARS no prompt token pays for it, yet a Responses answer echoes it in each full-object event
# and stores it: a 9 MB `description` inside the schema was stored with every response (hunt round 15 B-F3). 5000
# properties with short names take ~150,000 characters, and the grammar engine runs no object of more than 7499.
MAX_FORMAT_CHARS = 262_144


def _response_format(ask: Ask) -> harmony.ResponseFormatSection | None:
    """The answer's JSON Schema as the developer message states it (none for free text, any JSON object, or a
    schema over MAX_STATED_SCHEMA_CHARS); a 400 naming the format's field when it is over MAX_FORMAT_CHARS."""
    final = ask.final
    if final.schema is None:
        return None
    section = harmony.ResponseFormatSection(final.schema, final.name, final.description)
    length = len(section.text())
    if length > MAX_FORMAT_CHARS:
        raise bad_input(f"Error: at '/{ask.format_name.replace('.', '/')}': the JSON format takes {length} characters "
                        f"(its name, description and schema as compact JSON), more than the {MAX_FORMAT_CHARS} taken",
                        ask.format_name)
    return section if length <= MAX_STATED_SCHEMA_CHARS else None


def _logit_bias(ask: Ask, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias` with every token id inside the served model's vocabulary, or a 400 naming it."""
    for token, _ in ask.logit_bias:
        if token >= vocab_size:
            raise bad_input(f"Error: at '/logit_bias/{token}': token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                            f"logit_bias.{token}")
    return ask.logit_bias


def _sampling_params(ask: Ask, defaults: dict[str, Any], max_tokens: int, vocab_size: int) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=ask.temperature if ask.temperature is not None else defaults["temperature"],
            top_p=ask.top_p if ask.top_p is not None else 1.0,  # 0 (OpenAI's minimum) keeps only the most likely token
            top_k=ask.top_k or 0,
            min_p=ask.min_p or 0.0,
            seed=ask.seed,
            repetition_penalty=ask.repetition_penalty or 1.0,  # 0 (Workers AI's minimum) is off, as ROUTES.md says
            frequency_penalty=ask.frequency_penalty or 0.0,
            presence_penalty=ask.presence_penalty or 0.0,
            penalty_exempt_from=harmony.STARTOFTEXT,  # o200k_harmony's special tokens, the format's framing (`harmony.is_special`)
            stop_token_ids=tuple(harmony.STOP_TOKENS),
            logprobs=ask.logprobs,
            top_logprobs=ask.top_logprobs,
            logit_bias=_logit_bias(ask, vocab_size),
        )
    except ValueError as exc:
        raise bad_input(f"Error: {exc}") from None


class Service:
    def __init__(self, engine: EngineClient, settings, metering):
        self.engine = engine
        self.settings = settings
        self.metering = metering
        self.batch_store = None  # set by the app factory
        self.responses = ResponseStore(Path(settings.data_dir) / DATABASE)  # previous_response_id, GET /v1/responses/{id}
        for response_id in self.responses.damaged:  # once, at start (`serve` opens the file before, quietly)
            log.warning("stored response %s is set aside: its JSON in %s cannot be read (a hand edit, a partial restore?); "
                        "it cannot be retrieved or continued: delete it (DELETE /v1/responses/%s) or restore it, and restart",
                        response_id, DATABASE, response_id)
        from ossrun.api.background import BackgroundRuns  # it imports the surfaces, which import this module

        self.background = BackgroundRuns()  # Responses' background runs in progress, by response id
        self.finetunes = None
        self._unloadable: dict[str, str] = {}  # a fine-tune's name → why its stored files did not load at start
        # The data directory's failing writes, shared with the batch worker; once they work again, the background ends
        # held in memory meanwhile are written.
        self.storage = StorageHealth(Path(settings.data_dir), writable=self.responses.write_held)
        # Batch items are planned one at a time: they never take every thread of the pool that interactive
        # requests are planned on (a grammar check can take a second; 16 items took 15 s from a `Hello`).
        self._batch_planning = asyncio.Semaphore(1)

    @contextlib.contextmanager
    def writing(self, store: str, meanwhile: str = "such requests are answered 503") -> Iterator[None]:
        """A write to `store` ("the batch queue", "the fine-tunes", "the responses") that the data directory may refuse
        (a full disk, a read-only filesystem): then a 503 naming why, one log line per failure streak rather than a
        traceback (`meanwhile`: what clients get until it ends), and /health's `batch_store` failing until writes work
        again. Other errors pass through as they are."""
        try:
            yield
        except Exception as exc:
            cause = write_refusal(exc)
            if cause is None:
                raise
            self.storage.failed(store, f"{store}: a write to the data directory was refused ({cause}); {meanwhile} "
                                       "until it takes writes again", retried=False)
            raise storage_refused(store, cause) from None
        self.storage.worked(store)

    async def write(self, store: str, call: Callable[..., T], *args: Any, meanwhile: str = "such requests are answered 503") -> T:
        """`call(*args)`, a write to the data directory's database, on a thread, reported as `writing` reports it:
        SQLite waits out another process's write lock (up to `storage.BUSY_TIMEOUT_S`) there, not on the event loop,
        where every stream and /health would wait with it. A cancellation meanwhile is raised once the write has
        ended: it happens either way, and whoever the cancellation serves (a cancel, then a retrieve) reads it done."""
        with self.writing(store, meanwhile):
            return await _to_its_end(asyncio.to_thread(call, *args))

    async def keep_response(self, ask: Ask, response: dict[str, Any], replacing: bool = False) -> None:
        """Keep a Responses answer (retrieve, `previous_response_id`); `replacing`: only over its stored snapshot (a
        background run's end: a response deleted meanwhile stays deleted). The Responses store shares the batch
        queue's file, so a refusal is the same streak, one line per streak, and /health's `batch_store` says so: the
        data directory refusing writes is one condition, whichever store met it first. Raises the 503 (`write`); a
        sync answer's caller forgives it (`surfaces.for_plan`), a background create cannot (its store is all it is for)."""
        if not ask.store:  # nothing is written, so nothing may end a failure streak as if a write had worked
            return
        await self.write("the responses", self.responses.remember, response["id"], ask.items, ask.store, response, replacing,
                         meanwhile="background responses are refused (503), others answered but not kept (they cannot be "
                                   "continued)")

    # -- LoRA fine-tunes --------------------------------------------------------------------------
    def create_finetune(self, model: str, name: str, description: str = "", public: bool = False):
        """A new fine-tune; its name may not be one a `--lora` adapter is served under (requests could not tell them
        apart, and the fine-tune would replace that adapter)."""
        return self.finetunes.create(model, name, description, reserved=self.settings.loras, public=public)

    def upload_finetune_asset(self, id_or_name: str, file_name: str, arrived: Path):
        """Store an uploaded asset (the file `FinetuneStore.arrival` gave) and serve the fine-tune once both are there.
        A complete pair is loaded from where it is staged before the new file replaces the stored one, so a refused
        upload (400) changes nothing; a file that does not fit the stored one (another rank, other target modules)
        waits for its pair (`FinetuneStore`).
        Blocking: run it off the event loop."""
        return self.finetunes.upload(id_or_name, file_name, arrived, serve=self._serve_finetune)

    def _serve_finetune(self, record, folder: Path, install: Callable[[], Path]) -> None:
        """The store's `serve`: a pair of two valid files that disagree is its PairMismatch (the file waits)."""
        try:
            self.register_finetune(record, folder, install)
        except AdapterPairMismatchError:
            raise PairMismatch() from None

    def register_finetune(self, record, folder: Path | None = None, install: Callable[[], Path] | None = None) -> None:
        """Serve a fine-tune under its name (requests may also use its id), from its folder or from `folder`."""
        try:
            self.engine.register_adapter(record.name, folder or self.finetunes.folder(record), install)
            self._unloadable.pop(record.name, None)
        except AdapterPairMismatchError:
            raise
        except AdapterLoadError as exc:
            raise ApiError(400, 5005, f"AiError: {exc}") from None
        except Exception as exc:  # uploaded bytes are anything: a PNG as adapter_config.json must be a 400, not a 500
            raise ApiError(400, 5005, f"AiError: fine-tune {record.name!r} is not a loadable PEFT LoRA adapter "
                                      f"({type(exc).__name__}: {exc})") from None

    def load_finetunes(self) -> None:
        """At startup: every complete fine-tune on disk becomes servable again; one warning for each that cannot."""
        for folder, why in self.finetunes.damaged():
            log.warning("fine-tune folder %s is set aside: %s; its name is free again (move the folder away, or "
                        "restore its meta.json and restart)", folder, why)
        for record in self.finetunes.list():
            if not self.finetunes.missing_assets(record):
                try:
                    self.register_finetune(record)
                except (ApiError, AdapterLoadError) as exc:
                    log.warning("fine-tune %s not loadable: %s", record.name, exc)
                    self._unloadable[record.name] = str(exc).removeprefix("AiError: ")

    def adapter_name(self, lora: str) -> str:
        """A request's `lora` (a fine-tune's name or id, or a preloaded adapter) → the engine's adapter name."""
        record = self.finetunes.get(lora) if self.finetunes is not None else None
        by_id = record is not None and record.id == lora.lower()  # an id names its fine-tune, whatever else is called so
        if not by_id and self.engine.has_adapter(lora):
            return lora  # a preloaded adapter or a fine-tune's name
        if record is not None and self.engine.has_adapter(record.name):
            return record.name
        if record is not None:
            # Files missing: the hosted errors page's "Finetune is missing required files", 3039 (the contract's §7);
            # stored files that did not load stay 5005, the LoRA the model cannot take.
            code = 3039 if self.finetunes.missing_assets(record) else 5005
            raise ApiError(400, code, f"AiError: fine-tune {lora!r} is not loadable: {self._why_unloadable(record)}")
        raise unknown_lora(lora)

    def _why_unloadable(self, record) -> str:
        """What its owner can act on: the files missing, or why the stored ones did not load at start (a truncated
        file, a pair that disagrees), which they fix by uploading them again."""
        missing = ", ".join(self.finetunes.missing_assets(record))
        waiting = "".join(f"; the uploaded {name} waits for the other file that fits it (its rank, its target modules)"
                          for name in self.finetunes.pending_assets(record))
        if not missing and record.name in self._unloadable:
            return f"its stored files did not load ({self._unloadable[record.name]}); upload them again{waiting}"
        return f"missing {missing or 'a valid adapter'}{waiting}"

    @property
    def model_names(self) -> list[str]:
        return [self.engine.info.served_name]

    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            from ossrun.api.errors import unknown_model

            raise unknown_model(model)

    # -- planning -------------------------------------------------------------------------------
    def plan(self, ask: Ask, openai: bool = False, priority: Priority = Priority.INTERACTIVE, client: str | None = None) -> Plan:
        """The request as the engine runs it, every check done: a 400 here is one before any stream starts. `client`:
        who sent it (`Plan.client`)."""
        plan = self.draft(ask, openai, priority, client)
        if plan.grammar is not None:
            self._check(plan)  # compiles the grammar and searches its shortest answer within max_tokens
        return plan

    def draft(self, ask: Ask, openai: bool = False, priority: Priority = Priority.INTERACTIVE, client: str | None = None) -> Plan:
        """`plan` without compiling its grammar: what is cheap to check (rendering, fields, context, LoRA, tool
        choice), in milliseconds. The batch queue checks its items with it before answering "queued"; compiling
        a schema and the budget search (up to seconds each) wait until the item runs."""
        defaults = OPENAI_DEFAULTS if openai else WORKERS_AI_DEFAULTS
        ask, prompt_ids, forced = self._prompt(ask, defaults)
        max_tokens = _max_tokens(ask, defaults, self.engine.info.max_model_len - len(prompt_ids))
        params = _sampling_params(ask, defaults, max_tokens, self.engine.info.vocab_size)
        lora = self.adapter_name(ask.lora) if ask.lora is not None else None
        plan = Plan(ask.shape, ask, prompt_ids, params, lora, forced, ask.raw, ask.stream, priority, stop=ask.stop, client=client)
        self._check(plan)
        if not ask.raw:
            plan.grammar = self._grammar(ask, forced, max_tokens)
            plan.json_mode = ask.final.structured
        return plan

    def count_prompt(self, ask: Ask) -> int:
        """The prompt's tokens, as `plan` renders them (a forced call's header included, the oldest items dropped under
        `truncation: "auto"`): the `input_tokens` its response's usage reports, counted without checking what only
        generating needs (the window, the grammar)."""
        return len(self._prompt(ask, OPENAI_DEFAULTS)[1])

    def _prompt(self, ask: Ask, defaults: dict[str, Any]) -> tuple[Ask, list[int], str | None]:
        """The ask as it is rendered (under `truncation: "auto"`, without its oldest items when it does not fit), its
        prompt's token ids and the tool a named tool_choice calls. A 400 if it cannot be rendered; the context window's
        400 (code 8, the fewest tokens it can take for the prompt's) when its messages and tools alone cannot fit the
        window, before anything renders them (`harmony.PromptTooLong`), as a prompt over the window is refused after."""
        try:
            return self._truncated(ask, defaults) if ask.truncate else (ask, *self._rendered(ask))
        except harmony.PromptTooLong as exc:
            raise context_too_long(exc.least, ask.max_tokens or 0, self.engine.info.max_model_len, ask.limit_name,
                                   at_least=exc.why) from None

    def _rendered(self, ask: Ask) -> tuple[list[int], str | None]:
        """The prompt's token ids (a named tool's call header included) and that tool; a 400 if it cannot be rendered,
        PromptTooLong if its messages alone cannot fit the window."""
        forced = None
        try:
            if ask.raw:
                prompt_ids = harmony.encode(ask.prompt, allow_special=True) or [harmony.STARTOFTEXT]  # OpenAI accepts prompt ""
            else:
                rendered = harmony.render_conversation(_converted(ask), ask.tools, ask.effort,
                                                       response_format=_response_format(ask),
                                                       conversation_start_date=harmony.conversation_date(self.settings.conversation_date),
                                                       token_limit=self.engine.info.max_model_len)
                prompt_ids = list(rendered.token_ids)
                forced = _named_tool(ask, rendered.tool_names)
                if forced is not None:
                    if forced not in rendered.tool_names:
                        raise bad_input(f"Error: at '/tool_choice': no tool named {forced!r} in 'tools'", "tool_choice")
                    prompt_ids += harmony.tool_call_prefix(forced)
        except harmony.PromptTooLong:
            raise
        except harmony.RenderError as exc:
            raise bad_input(f"Error: {exc}", exc.param) from None
        except BaseException as exc:
            # The Rust tokenizer panics (a BaseException) on some huge inputs, e.g. megabytes without a space.
            if type(exc).__name__ != "PanicException":
                raise
            raise bad_input("Error: the prompt cannot be tokenized (is it one enormous word?)") from None
        if not prompt_ids:
            raise bad_input("Error: the prompt renders to no tokens")
        return prompt_ids, forced

    def _truncated(self, ask: Ask, defaults: dict[str, Any]) -> tuple[Ask, list[int], str | None]:
        """Responses' `truncation: "auto"`: the ask without as few of its oldest items (`harmony.droppable_items`) as
        leave the answer its room (`_answer_room`), its prompt and forced tool; without all of them when even that is
        too little (the context check then answers as without truncation, naming the shortest prompt). The prompt
        shrinks as more items go, so the fewest is searched for (`_fewest`), a render per try (a second for 128k
        tokens), from a guess by the items' length: a 10 MB input is cut in a few tries, not dozens. A conversation
        whose items alone cannot fit the window (PromptTooLong) is not rendered: it does not fit, and its fewest tokens
        stand for its length in the guess. PromptTooLong when even the shortest cannot fit."""
        budget = self.engine.info.max_model_len - _answer_room(ask, defaults, self.engine.info.max_model_len)
        whole = self._rendered_or_too_long(ask)
        length = len(whole[1]) if isinstance(whole, tuple) else whole.least
        units = harmony.droppable_items(ask.items) if length > budget else []
        tried: dict[int, tuple[Ask, list[int], str | None] | harmony.PromptTooLong] = {0: whole}

        def fits(count: int) -> bool:
            tried[count] = self._rendered_or_too_long(_dropping(ask, units[:count]))
            return isinstance(tried[count], tuple) and len(tried[count][1]) <= budget

        fewest = _fewest(fits, len(units), _guess(ask.items, units, length - budget, length)) if units else 0
        if isinstance(tried[fewest], harmony.PromptTooLong):
            raise tried[fewest]
        return tried[fewest]

    def _rendered_or_too_long(self, ask: Ask) -> tuple[Ask, list[int], str | None] | harmony.PromptTooLong:
        """`ask` with its prompt and forced tool, or the PromptTooLong rendering it raised (truncation tries another)."""
        try:
            return (ask, *self._rendered(ask))
        except harmony.PromptTooLong as exc:
            return exc

    def choice_plans(self, plan: Plan) -> list[Plan]:
        """One plan per choice of `n` (each its own seed; the engine gives each its own grammar state); [plan] for n = 1."""
        from ossrun.api.choices import derive_seed

        return [plan] + [dataclasses.replace(plan, params=dataclasses.replace(plan.params, seed=derive_seed(plan.params.seed, index)))
                         for index in range(1, plan.ask.n)]

    async def plan_off_loop(self, *args: Any, **kwargs: Any) -> Plan:
        """`plan` on a worker thread: rendering a long prompt or compiling a schema takes a while, and the
        event loop must keep answering `/health` and streaming other requests' tokens meanwhile. Batch items
        (`priority=Priority.BATCH`) queue for one thread, behind each other rather than in front of interactive
        requests."""
        if kwargs.get("priority") != Priority.BATCH:
            return await asyncio.to_thread(self._plan_in_thread, *args, **kwargs)
        async with self._batch_planning:
            return await asyncio.to_thread(self._plan_in_thread, *args, **kwargs)

    def _plan_in_thread(self, *args: Any, **kwargs: Any) -> Plan:
        """`plan`, whose refusal leaves the thread without its traceback: the frames it holds keep the prompt's token
        lists alive (an 8 MB prompt's 1.4 million ids, three times over), which freeing would otherwise cost the
        event loop a third of a second when it answers the error. Here they are freed on the worker thread."""
        try:
            return self.plan(*args, **kwargs)
        except ApiError as exc:
            exc.__context__ = exc.__cause__ = None  # the engine's ContextLengthError, with frames of its own
            raise exc.with_traceback(None)

    # -- structured output ------------------------------------------------------------------------
    def _grammar(self, ask: Ask, forced: str | None, max_tokens: int) -> Grammar:
        """The grammar a request's output must follow. A named (prefilled) tool call gets its arguments
        constrained; `required`/`auto` tools and `response_format` / Responses `text.format` constrain the
        whole completion, leaving the reasoning free (within a budget where the answer must fit in max_tokens: a JSON
        answer, a `required` call; `harmony.grammar.answer_must_fit`). A plain answer (no tool to call, or
        `tool_choice: "none"`) gets `harmony.grammar.no_recipient()`: free, as without a grammar, except that no
        message can be addressed to a recipient (read back, a call nobody offered)."""
        try:
            # The tools the model may call (`allowed_tools` leaves the others in the prompt, not in the grammar); one
            # without `parameters` takes none, and `{}` (a schema that says nothing) any object.
            tools = {t.name: harmony_grammar.NO_PARAMETERS if t.parameters is None else t.parameters or None
                     for t in harmony.tool_descriptions(ask.tools)
                     if ask.allowed is None or t.name in ask.allowed}
            # OpenAI restricts the schema language only for `strict: true` (absent: false, on every surface here).
            specs = (t.function if isinstance(t, WrappedTool) else t for t in ask.tools)
            lenient = {spec.name for spec in specs if spec.strict is not True}
            if forced is not None:
                return harmony_grammar.arguments(forced, tools.get(forced), max_tokens=max_tokens, strict=forced not in lenient)
            # Reasoning is bounded only to leave room for an answer that must fit (hunt round 14 A-F1: "auto" with a
            # free-text answer had its reasoning ended at half a small max_tokens, for nothing).
            must_fit = harmony_grammar.answer_must_fit(ask.tool_choice, ask.final.structured)
            budget = harmony_grammar.default_reasoning_budget(max_tokens) if must_fit else None
            return harmony_grammar.tools(tools, ask.tool_choice, ask.final.schema, json_final=ask.final.structured,
                                         reasoning_budget=budget, max_tokens=max_tokens, lenient=lenient,
                                         final_strict=ask.final.strict)
        except (GrammarError, harmony.RenderError) as exc:
            raise bad_input(f"Error: {exc}") from None

    def _submission(self, plan: Plan) -> Submission:
        return Submission(uuid.uuid4().hex, plan.prompt_ids, plan.params, plan.priority, plan.lora, plan.grammar,
                          plan.group, plan.client)

    def _check(self, plan: Plan) -> None:
        """What the engine would refuse, refused now (a 400 before any stream starts)."""
        try:
            self.engine.check(self._submission(plan))
        except ContextLengthError as exc:
            raise context_too_long(exc.prompt_tokens, exc.max_tokens, exc.limit, plan.ask.limit_name) from None
        except UnknownAdapterError as exc:
            raise unknown_lora(exc.name) from None
        except BudgetTooSmall as exc:  # named as the caller named it (`max_output_tokens` on Responses)
            raise bad_input(f"Error: {exc.named(plan.ask.max_tokens_name)}", plan.ask.max_tokens_name) from None
        except ValueError as exc:  # GrammarError (a schema the grammar engine refuses names its field), a token outside the vocabulary
            raise bad_input(f"Error: {exc}", _schema_field(plan.ask, getattr(exc, "schema", None))) from None

    def is_busy(self) -> bool:
        stats = self.engine.stats()
        return stats["waiting"] > 0 or stats["running"] >= self.engine.info.max_num_seqs

    # -- running ----------------------------------------------------------------------------------
    async def run(self, plan: Plan) -> AsyncIterator[Step]:
        """The engine's tokens for this plan, each with the harmony events it produced."""
        parser = PlainText(plan.prompt_ids) if plan.shape == "completions" else harmony.StreamParser(prompt_ids=plan.prompt_ids)
        hidden = PlainText.hides if plan.shape == "completions" else harmony.is_special
        stops = StopStrings(plan.stop) if plan.stop else None
        joined = JoinedMessages() if plan.shape in JOINED_SHAPES else None
        parsed = shown = 0  # answer characters from the parser, and those the stop strings let through
        stream = self.engine.submit(self._submission(plan))
        try:
            async for token in stream:
                if token.finish_reason == "error":
                    raise ApiError(500, 3000, f"AiError: {token.error or 'generation failed'}")
                if token.finish_reason == "abort":  # only shutdown aborts a request whose client still listens
                    raise ShuttingDownError("aborted")
                counted = parser.reasoning_tokens  # `feed` and `finish` count this step's reasoning (a header's too)
                events = parser.feed(token.token_id) if token.token_id is not None else []
                if token.finished:
                    reason = "length" if token.finish_reason == "length" else "stop"
                    events += parser.finish(reason)
                    if reason == "length":  # also an answer that ended on <|return|>/<|call|> but was shaped by max_tokens
                        events = [harmony.Finished("length") if isinstance(e, harmony.Finished) else e for e in events]
                if joined is not None:
                    events = joined.join(events)
                is_hidden = token.token_id is not None and hidden(token.token_id)
                if stops is not None:
                    parsed += _text_length(events)
                    events = stops.filter(events)
                    # A stop string completing in a header's text ends the answer too: finishing reads it as the answer.
                    ends = stops.matched is not None or stops.completes_in(
                        joined.preview(parser.answer_preview()) if joined is not None else parser.answer_preview())
                    if ends and not token.finished:  # leaving the loop ends the engine request
                        closing = parser.finish("stop")
                        closing = joined.join(closing) if joined is not None else closing
                        parsed += _text_length(closing)
                        events += stops.filter(closing)
                        shown += _text_length(events)
                        yield Step(dataclasses.replace(token, finish_reason="stop", stop_reason=stops.matched), events,
                                   parsed - shown, is_hidden, parser.reasoning_tokens - counted, parser.take_salvaged(),
                                   parser.in_open_header)
                        return
                    shown += _text_length(events)
                    if stops.matched is not None:
                        token = dataclasses.replace(token, finish_reason="stop", stop_reason=stops.matched)
                yield Step(token, events, parsed - shown, is_hidden, parser.reasoning_tokens - counted, parser.take_salvaged(),
                           parser.in_open_header)
        except ContextLengthError as exc:
            raise context_too_long(exc.prompt_tokens, exc.max_tokens, exc.limit, plan.ask.limit_name) from None
        except UnknownAdapterError as exc:
            raise unknown_lora(exc.name) from None
        except ShuttingDownError:
            raise ApiError(*SHUTTING_DOWN) from None
        finally:
            await stream.aclose()

    @staticmethod
    def account(outcome: Outcome, step: Step) -> None:
        """Fold one step's counters into the outcome (shared by sync and streaming routes). The prompt counts from
        the first step: a request that ends before the engine gave it one (its client left, or it timed out or was
        cancelled, while it waited) was never read, and is neither answered nor metered as if it had been."""
        token = step.token
        outcome.prompt_tokens = token.num_prompt_tokens
        outcome.cached_tokens = token.num_cached_tokens
        outcome.cache_write_tokens = token.num_cache_write_tokens
        outcome.reasoning_tokens += step.reasoning  # a header read as reasoning at the end counts its earlier tokens
        if token.token_id is None:
            return
        outcome.completion_tokens += 1
        if token.logprob is not None:
            Service._account_logprobs(outcome, step)
        if token.finished and token.finish_reason == "length":
            outcome.finish_reason = "length"
        if isinstance(token.stop_reason, str):
            outcome.stop_reason = token.stop_reason


    @staticmethod
    def _account_logprobs(outcome: Outcome, step: Step) -> None:
        """Logprobs of the answer's tokens: exactly those whose whole text is in the returned text. The
        parser may show a token's text only steps later (it waits to know the text is not a header), and
        stop strings hold back text that may still become one and cut the text at a match, so tokens wait
        until their text is shown; a hidden token (a harmony special in chat) or reasoning / tool-call text
        means the waiting tokens were not the answer's. A token whose text is not wholly shown yet (held back
        by a stop string) keeps waiting; after a match, for ever: a token straddling the cut is not listed,
        so the entries never spell text the answer does not have. When a header without `<|message|>` is read as
        the answer, the tokens that spelled its pieces (or straddle into its text) were not the answer's either;
        those of its text were, on both sides of a special token inside it (a stray `<|channel|>`), so such a
        token, hidden, keeps the header's tokens waiting."""
        token, events = step.token, step.events
        pending, held = outcome.pending_logprobs, outcome.held_logprobs
        if not step.hidden:
            pending.append(logprob_entry(token))
        if step.salvaged is not None:
            del pending[:max(0, len(pending) - step.salvaged)]
        if any(isinstance(e, harmony.ContentDelta) for e in events):
            pending[:0], held[:] = held, []
            keep = _first_unshown(pending, step.unshown)
            outcome.logprobs += pending[:keep]
            del pending[:keep]
        elif any(isinstance(e, (harmony.ReasoningDelta, harmony.ToolCallStart, harmony.ToolCallArgumentsDelta)) for e in events):
            pending.clear()
        if step.hidden and not step.in_header:
            # A message's end: stop strings may still hold its text's tail (the next message's text joins it), so
            # its tokens wait beside the next header's, which are not the answer's.
            held += pending[_first_unshown(pending, step.unshown - sum(map(characters_started, held))):]
            pending.clear()


async def _to_its_end(work: Awaitable[T]) -> T:
    """`work`'s result, awaited to its end even when the caller is cancelled meanwhile (then the cancellation is
    raised after it, and its own outcome dropped)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the caller hears the cancellation
        raise


# The shapes whose answer is one text per field (chat `content` and `reasoning_content`, /ai/run `response`): the
# texts of a field's messages are joined there. Responses keeps each message an item; /v1/completions is raw text.
JOINED_SHAPES = ("prompt", "messages")


class JoinedMessages:
    """The texts of several messages that go into one field joined with "\n", as vLLM's gpt-oss parsing joins them:
    glued, a preamble and the answer read `'Let me check.Answer.'`. The "\n" opens the next message's first text, only
    when both sides have text, so a stream's deltas still add up to the sync text."""

    def __init__(self) -> None:
        self._written: set[type] = set()  # the fields (delta types) that have text
        self._ended: set[type] = set()  # those of them whose last message has ended since

    def join(self, events: list[harmony.Event]) -> list[harmony.Event]:
        out: list[harmony.Event] = []
        for event in events:
            if isinstance(event, harmony.MessageEnd):
                self._ended |= self._written
            elif isinstance(event, (harmony.ContentDelta, harmony.ReasoningDelta)) and event.text:
                kind = type(event)
                if kind in self._ended:
                    event = dataclasses.replace(event, text="\n" + event.text)
                self._written.add(kind)
                self._ended.discard(kind)
            out.append(event)
        return out

    def preview(self, text: str) -> str:
        """`text` as the answer would show it if it became the next answer message's (`StreamParser.answer_preview`)."""
        return "\n" + text if text and harmony.ContentDelta in self._ended else text


def _first_unshown(entries: list[dict[str, Any]], unshown: int) -> int:
    """Index of the first of `entries` (a text's last tokens) whose text is (partly) among its `unshown` last
    characters: held back or cut off by stop strings."""
    first, tail = len(entries), 0
    while first and tail < unshown:
        first, tail = first - 1, tail + characters_started(entries[first - 1])
    return first


def characters_started(entry: dict[str, Any]) -> int:
    """Characters of the text that begin in this logprob entry's bytes (its UTF-8 lead bytes): a character split
    over tokens belongs to the token it starts in, so a cut through that character leaves all its pieces out."""
    return sum(1 for byte in entry["bytes"] if byte & 0xC0 != 0x80)


def _text_length(events: list[harmony.Event]) -> int:
    return sum(len(e.text) for e in events if isinstance(e, harmony.ContentDelta))


class PlainText:
    """What `/v1/completions` shows: every generated token's text, no harmony parsing. It has the
    harmony parser's interface, so stop strings and logprobs treat both surfaces' text alike. A harmony
    parser follows along only to tell reasoning from the rest: `reasoning_tokens` (and `/metrics`) count the
    tokens of an analysis message's text, as for the same text sent raw to `/ai/run`."""

    def __init__(self, prompt_ids: list[int]) -> None:
        self._decoder = harmony.TextDecoder()
        self._channels = harmony.StreamParser(prompt_ids=prompt_ids)
        self._ended = False  # the last token fed ended generation (<|return|>, <|call|>): the model's own end

    @property
    def reasoning_tokens(self) -> int:
        return self._channels.reasoning_tokens

    @staticmethod
    def take_salvaged() -> None:
        """No headers here: nothing is ever salvaged from one."""
        return None

    in_open_header = False  # nor is any token held in one

    @staticmethod
    def answer_preview() -> str:
        """Every token's text is shown at once: none waits in a header for stop strings to look ahead at."""
        return ""

    @staticmethod
    def hides(token_id: int) -> bool:
        """Only the tokens that end generation are not shown: harmony's other specials are text here."""
        return token_id in harmony.STOP_TOKENS

    def feed(self, token_id: int) -> list[harmony.Event]:
        self._channels.feed(token_id)  # its events are not shown here: only where a reasoning message is
        self._ended = self.hides(token_id)
        text = "" if self.hides(token_id) else self._decoder.feed(token_id)
        return [harmony.ContentDelta(text)] if text else []

    def finish(self, reason: str) -> list[harmony.Event]:
        self._channels.finish(reason)  # a header left without <|message|> may be read as reasoning
        text = self._decoder.flush() if self._ended else self._decoder.cut()  # a cut drops an incomplete character
        return [*([harmony.ContentDelta(text)] if text else []), harmony.Finished(reason)]


def logprob_entry(token: TokenEvent) -> dict[str, Any]:
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        data = harmony.token_bytes(token_id)
        return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}

    entry = one(token.token_id, token.logprob)
    entry["top_logprobs"] = [one(t.token_id, t.logprob) for t in token.top_logprobs]
    return entry


def usage(outcome: Outcome, prices) -> dict[str, Any]:
    """OpenAI-style usage with the details the hosted API reports, plus our cost estimate."""
    cost, neurons = prices.cost(outcome.prompt_tokens, outcome.completion_tokens)
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": outcome.reasoning_tokens},
        "cost_usd": cost,
        "neurons": neurons,
    }
