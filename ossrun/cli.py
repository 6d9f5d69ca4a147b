"""The `ossrun` command: serve, generate, tokenize, make-model, make-adapter, download."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import NoReturn, Optional

import typer

from ossrun.paths import data_dir as default_data_dir

log = logging.getLogger(__name__)
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Serve OpenAI's gpt-oss models with the Workers AI API.")


class Preset(str, Enum):
    tiny = "tiny"
    small = "small"
    b20 = "20b"
    b120 = "120b"


class Layout(str, Enum):
    original = "original"
    hf = "hf"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class Precision(str, Enum):
    fast = "fast"
    exact = "exact"


MODEL_HELP = ("Checkpoint directory, `demo`, downloaded hub id (`ossrun download openai/gpt-oss-20b`), or preset name "
              "(tiny, small, 20b, 120b: random weights for tests and benchmarks, written to the cache on first use, "
              "13.8 GB for 20b, 65 GB for 120b). Default: the demo model.")
PRECISION_HELP = "fast: 8-bit dense weights and native kernels; exact: the reference computation (equal to transformers in float32)."
DTYPE_HELP = "Activations and KV cache (default: float32 with --precision exact, bfloat16 with fast)."
# A flag's value column: typer would show `<bool>`, as if `--json true` were taken (it is refused).
FLAG = ""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fail(message: str) -> NoReturn:
    """A user's mistake: one line on stderr and exit status 2 (as for a bad option), no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[Exception], ...]:
    """What a wrong --model, --device, --lora or cache size raises (imported late: `tokenize` needs no torch)."""
    from ossrun.engine.errors import AdapterLoadError, CacheTooSmallError
    from ossrun.model.checkpoint import CheckpointError
    from ossrun.model.gpt_oss import DeviceError
    from ossrun.model.lora import AdapterError
    from ossrun.model.resolve import CacheUnwritable, ModelNotFound
    from ossrun.serve import SettingsError

    return (ModelNotFound, CacheUnwritable, CheckpointError, DeviceError, AdapterError, AdapterLoadError, CacheTooSmallError,
            SettingsError)


@contextmanager
def _reported(verbose: bool) -> Iterator[None]:
    """Users' mistakes (`_user_errors`) as one line; with --verbose, the traceback too."""
    try:
        yield
    except Exception as exc:
        if verbose or not isinstance(exc, _user_errors()):
            raise
        _fail(str(exc))


def _positive(name: str) -> Callable[[float], float]:
    """A finite number above 0: NaN passes a `<= 0` test (and then every timeout fires at once), inf a cache size."""
    def check(value: float) -> float:
        if not (0 < value < math.inf):
            raise typer.BadParameter(f"{name} must be a finite number greater than 0")
        return value
    return check


def _conversation_date(value: str) -> str:
    """`today`, `none` or a date YYYY-MM-DD, refused in one line before the model loads."""
    from ossrun.harmony import check_conversation_date

    try:
        return check_conversation_date(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


CONVERSATION_DATE_HELP = ("The date the system message states (harmony's `Current date:`, as OpenAI's and vLLM's renderings "
                          "give it): `today` (UTC, the day each prompt is rendered), a fixed date YYYY-MM-DD, or `none` "
                          "to leave it out (the same prompt's tokens every day).")


def _api_token(value: Optional[str]) -> Optional[str]:
    """An empty token (often a secret that did not resolve: `-e OSSRUN_API_TOKEN=$UNSET`) would serve with no
    authentication at all, and one with spaces around it could never be presented (the header's value is stripped):
    both refused. So is one of other characters than printable ASCII: header values arrive as Latin-1, so clients
    sending UTF-8 (curl in a UTF-8 shell) never matched 'sécret', and the OpenAI SDK cannot send it at all (hunt round
    17 A-F6); a control character cannot be in a header. click reads an empty variable as unset, hence the look at the
    environment itself."""
    if value is None and "OSSRUN_API_TOKEN" in os.environ:
        value = os.environ["OSSRUN_API_TOKEN"]
    if value is not None and (not value.strip() or value != value.strip()):
        raise typer.BadParameter("the token is empty or has spaces around it (from --api-token or OSSRUN_API_TOKEN); "
                                 "leave both unset to serve without a token")
    if value is not None and not (value.isascii() and value.isprintable()):
        odd = next(c for c in value if not (c.isascii() and c.isprintable()))
        _fail(f"--api-token (or OSSRUN_API_TOKEN) holds {ascii(odd)}, which HTTP clients cannot send in a header as the "
              "server reads it; use printable ASCII characters only")
    return value


def _check_out(out: Path, directory: bool) -> None:
    """An --out of the wrong kind, or in a folder that is not there or cannot be written, refused before any work
    (train-demo trains for minutes before it writes)."""
    if directory and out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; it takes a directory")
    if not directory and out.is_dir():
        _fail(f"--out {out} is a directory; it takes a file")
    if not directory and not out.parent.is_dir():  # a file's folder is not made for it
        _fail(f"--out {out}: no folder {out.parent}")
    parent = out if out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:  # directories are made; the first one that is there decides
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        _fail(f"--out {out}: {parent} cannot be written")


@contextmanager
def _writing(out: Path, what: str, directory: bool) -> Iterator[None]:
    """`_check_out` first, then a write that fails anyway (a full disk, a file system refusing it) as one line."""
    _check_out(out, directory)
    try:
        yield
    except OSError as exc:
        _fail(f"--out {out}: cannot write {what} ({exc.strerror or exc})")


@app.command("make-model")
def make_model(
    preset: Preset = typer.Option(Preset.tiny, help="Architecture preset (random weights in the official format)."),
    layout: Layout = typer.Option(Layout.original, help="`original` (reference) or `hf` (Hugging Face root) layout."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same values in both layouts."),
    out: Path = typer.Option(..., help="Output directory."),
) -> None:
    """Write a random gpt-oss checkpoint (MXFP4 experts, bf16 rest) without holding it all in memory."""
    from ossrun.model.checkpoint import write_random_checkpoint
    from ossrun.model.config import PRESETS

    start = time.perf_counter()
    with _writing(out, "the checkpoint", directory=True):
        write_random_checkpoint(PRESETS[preset.value], out, layout.value, seed)
    typer.echo(f"wrote {preset.value} ({layout.value} layout, seed {seed}) to {out} in {time.perf_counter() - start:.1f}s")


@app.command("make-adapter")
def make_adapter(
    model: Optional[str] = typer.Option(None, help="The base checkpoint (directory, preset or hub id): its shapes."),
    rank: int = typer.Option(8, min=1, max=32),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., help="Output directory (PEFT format)."),
) -> None:
    """Write a random PEFT LoRA adapter on q/k/v/o_proj for the given base model (tests, demos)."""
    from ossrun.model.checkpoint import read_config
    from ossrun.model.lora import write_random_adapter
    from ossrun.model.resolve import resolve_model

    with _reported(verbose=False):
        config = read_config(resolve_model(model))
    with _writing(out, "the adapter", directory=True):
        write_random_adapter(config, out, rank=rank, seed=seed)
    typer.echo(f"wrote a rank-{rank} adapter to {out}")


def _argument_text(value: str | None) -> str | None:
    """The value itself, or for `@FILE` the file's text (`@-`: stdin), as curl reads its `-d @file`: a command line
    holds at most ~128 KiB an argument (Linux's MAX_ARG_STRLEN), about 22k tokens of text, so a long-context prompt
    could not be given at all."""
    if value is None or not value.startswith("@"):
        return value
    name = value[1:]
    try:
        return sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read the prompt from {name!r}: {getattr(exc, 'strerror', None) or exc}")


def _parse_token_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter("--token-ids takes comma-separated integers, e.g. 1,2,3") from None


@app.command()
def generate(
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    raw: Optional[str] = typer.Option(None, help="Prompt text, tokenised with harmony special tokens allowed (no chat template). "
                                                 "Each prompt option takes @FILE (or @- for stdin) for a long one."),
    prompt: Optional[str] = typer.Option(None, help="One user turn, rendered in the harmony chat format."),
    token_ids: Optional[str] = typer.Option(None, help="Prompt token ids, comma-separated (bypasses the tokenizer)."),
    max_tokens: int = typer.Option(32, min=1),
    temperature: float = typer.Option(0.0, min=0.0),
    top_p: float = typer.Option(1.0, help="In [0, 1]; 0 keeps only the most likely token."),
    top_k: int = typer.Option(0, min=0, help="0: no top-k cut."),
    seed: Optional[int] = typer.Option(None),
    precision: Precision = typer.Option(Precision.fast, help=PRECISION_HELP),
    dtype: Optional[DType] = typer.Option(None, help=DTYPE_HELP),
    device: str = typer.Option("cpu"),
    conversation_date: str = typer.Option("today", callback=_conversation_date, help=CONVERSATION_DATE_HELP),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help='Print {"token_ids": [...], "text": "..."}.'),
    verbose: bool = typer.Option(False, "--verbose", "-v", metavar=FLAG,
                                 help="Log at info level (the model's load, the KV cache's size); a mistake's traceback too."),
) -> None:
    """Generate one completion from the command line (greedy with --temperature 0)."""
    _setup_logging(verbose)
    from ossrun import harmony
    from ossrun.engine.async_engine import build_engine
    from ossrun.engine.request import Request, SamplingParams
    from ossrun.model.gpt_oss import check_device
    from ossrun.model.resolve import preset_warning, resolve_model

    given = [x for x in (raw, prompt, token_ids) if x is not None]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of --raw, --prompt, --token-ids")
    raw, prompt, token_ids = (_argument_text(x) for x in (raw, prompt, token_ids))
    if token_ids is not None:
        ids = _parse_token_ids(token_ids)
    elif raw is not None:
        ids = harmony.encode(raw, allow_special=True)
    else:
        ids = harmony.render_request({"prompt": prompt}, conversation_start_date=harmony.conversation_date(conversation_date)).token_ids
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                stop_token_ids=tuple(harmony.STOP_TOKENS))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    warning = preset_warning(model)
    if warning:
        log.warning(warning)
    with _reported(verbose):
        check_device(device)
        engine = build_engine(resolve_model(model), dtype and dtype.value, device, precision.value, decode_token=harmony.token_bytes)
    request = Request(uuid.uuid4().hex, ids, params)
    try:
        engine.validate(request)  # an empty prompt, a token id outside the vocabulary, too long for the context
    except ValueError as exc:
        _fail(str(exc))
    (events,) = engine.generate([request]).values()
    if events[-1].finish_reason == "error":  # e.g. logits all NaN: no fabricated tokens, one line and a failure
        _fail(events[-1].error)
    out = [e.token_id for e in events if e.token_id is not None]
    text = harmony.decode(out)
    if as_json:
        typer.echo(json.dumps({"token_ids": out, "text": text}, ensure_ascii=False))
    else:
        typer.echo(text)


@app.command("train-demo")
def train_demo(
    out: Optional[Path] = typer.Option(None, help="Compact weights file to write (default: the package's own, replaced)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Training steps (default: the shipped recipe's)."),
    samples: Optional[int] = typer.Option(None, min=1, help="Conversations generated (default: the shipped recipe's)."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, min=1, help="Torch threads (1 is fastest on a busy machine)."),
    verbose: bool = typer.Option(True, "--verbose/--quiet", "-v/-q", metavar=FLAG,
                                 help="Log each training step's loss; --quiet: warnings only."),
) -> None:
    """Train the embedded demo model from scratch (seeded), export it, and show its greedy answers."""
    _setup_logging(verbose)
    import dataclasses
    import tempfile

    import torch

    from ossrun.demo_model import evaluate
    from ossrun.demo_model.export import export
    from ossrun.demo_model.train import DEMO_CONFIG, TrainSettings, train
    from ossrun.model.demo_weights import WEIGHTS_FILE, expand

    if out is None and (steps is not None or samples is not None):  # the recipe's own run rewrites what ships, seeded
        _fail("--steps or --samples without --out would replace the shipped demo weights with another model: give "
              "--out FILE (and serve it with --model FILE)")
    target = out or WEIGHTS_FILE
    _check_out(target, directory=False)
    torch.set_num_threads(threads)
    settings = TrainSettings(seed=seed)
    changes = {name: value for name, value in (("steps", steps), ("samples", samples)) if value is not None}
    settings = dataclasses.replace(settings, **changes)
    result = train(DEMO_CONFIG, settings)
    final_loss = sum(result.losses[-20:]) / len(result.losses[-20:])
    with _writing(target, "the weights", directory=False):
        export(result.model, result.vocab, target, {"steps": str(settings.steps), "seed": str(seed),
                                                    "final_loss": f"{final_loss:.4f}", "seconds": f"{result.seconds:.0f}"})
    with tempfile.TemporaryDirectory() as tmp:
        model = evaluate.load(expand(target, Path(tmp) / "demo"))
        for question, completion in evaluate.report(model):
            typer.echo(f"{question}\n  → {completion}")
    typer.echo(f"trained {settings.steps} steps in {result.seconds:.0f} s, final loss {final_loss:.4f} "
               f"(mean of the last 20 steps); wrote {target}")


@app.command()
def tokenize(text: str = typer.Argument(..., help="Text; harmony special tokens like <|start|> are recognised.")) -> None:
    """Print the o200k_harmony token ids of TEXT (offline)."""
    from ossrun import harmony

    typer.echo(json.dumps(harmony.encode(text, allow_special=True)))


@app.command()
def download(repo_id: str = typer.Argument("openai/gpt-oss-20b"),
             revision: Optional[str] = typer.Option(None, help="A branch, tag or commit instead of main; the id names "
                                                    "main, so serve it by the snapshot directory printed.")) -> None:
    """Fetch the real weights from the Hugging Face hub into its local cache."""
    from ossrun.model.resolve import download as fetch

    try:
        path = fetch(repo_id, revision)
    except Exception as exc:  # network, auth, unknown repo: say which, fail fast
        typer.echo(f"error: could not download {repo_id} from the Hugging Face hub: {type(exc).__name__}: {exc}", err=True)
        typer.echo("Check the network (or HF_ENDPOINT / proxy settings), or pass --model DIR to use weights already on disk.", err=True)
        raise typer.Exit(1)
    typer.echo(str(path))


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8787, min=1, max=65535),
    api_token: Optional[str] = typer.Option(None, envvar="OSSRUN_API_TOKEN", callback=_api_token, help="Require `Authorization: Bearer TOKEN`."),
    precision: Precision = typer.Option(Precision.fast, help=PRECISION_HELP),
    dtype: Optional[DType] = typer.Option(None, help=DTYPE_HELP),
    device: str = typer.Option("cpu"),
    data_dir: Optional[Path] = typer.Option(None, envvar="OSSRUN_DATA_DIR", show_default=str(default_data_dir()),
                                            help="Where the batch queue, fine-tunes and stored Responses live."),
    rate_limit: int = typer.Option(300, min=0, help="POST requests per minute per token with --api-token, else per client "
                                                    "address (0: no limit)."),
    lora: list[str] = typer.Option([], help="Preload an adapter: NAME=DIR (repeatable); read once, at start (a change "
                                            "to DIR takes effect at the next start)."),
    max_num_seqs: int = typer.Option(64, min=1, help="Requests batched together at most."),
    kv_cache_gib: float = typer.Option(2.0, callback=_positive("--kv-cache-gib"), help="Memory for the KV cache."),
    max_batch_requests: int = typer.Option(1000, min=1, help="Requests per queued batch at most."),
    request_timeout: float = typer.Option(540.0, callback=_positive("--request-timeout"), help="Seconds a sync request may run before a 408 (under the openai SDKs' 600 s timeout, so that they see it and do not retry)."),
    max_model_len: int = typer.Option(128000, min=16, help="Served context window (prompt + max_tokens)."),
    client_timeout: float = typer.Option(30.0, callback=_positive("--client-timeout"),
                                         help="Seconds a client may take to send a request's headers (then the connection is closed) "
                                              "or pause within its body (then a 408); a body must also average 8 KiB/s beyond that. A client "
                                              "that takes nothing of an answer for as long is disconnected (its request cancelled)."),
    forwarded_allow_ips: Optional[str] = typer.Option(None, help="Proxies (comma-separated addresses or networks, `*` for any "
                                                                 "peer) whose X-Forwarded-For names the client, e.g. for the rate "
                                                                 "limit, and whose X-Forwarded-Host names the playground's host "
                                                                 "(default: none). With `*` a client that reaches the port "
                                                                 "directly picks its own address: fine only when the proxy is "
                                                                 "the only way in."),
    allowed_origins: Optional[str] = typer.Option(None, envvar="OSSRUN_ALLOWED_ORIGINS",
                                                  help="Web origins (comma-separated, e.g. http://localhost:3000, https://*.example.com, "
                                                       "http://localhost:*; `*` for any) whose pages "
                                                       "may call the server from a browser, with CORS (default: only the server's own, "
                                                       "the playground)."),
    conversation_date: str = typer.Option("today", callback=_conversation_date, help=CONVERSATION_DATE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", metavar=FLAG,
                                 help="Log at info level: one line per answer (method, path, status, request id), the "
                                      "model's load; a mistake's traceback too."),
) -> None:
    """Serve the Workers AI and OpenAI APIs."""
    _setup_logging(verbose)
    from ossrun.serve import ServerSettings, serve as run_server

    settings = ServerSettings(model=model, host=host, port=port, api_token=api_token, dtype=dtype and dtype.value,
                              precision=precision.value, device=device,
                              data_dir=data_dir, rate_limit_per_minute=rate_limit, loras=lora, max_num_seqs=max_num_seqs,
                              kv_cache_gib=kv_cache_gib, max_batch_requests=max_batch_requests,
                              request_timeout_s=request_timeout, max_model_len=max_model_len,
                              client_timeout_s=client_timeout, forwarded_allow_ips=forwarded_allow_ips,
                              allowed_origins=allowed_origins, conversation_date=conversation_date)
    with _reported(verbose):
        run_server(settings)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
