"""The o200k_harmony tokenizer: exact ids, the bundled vocabulary's hash, and no network, ever."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ossrun import harmony
from ossrun.harmony import tokenizer


def test_tokenize_examples_from_the_issue():
    assert harmony.encode("Hello, world!", allow_special=True) == [13225, 11, 2375, 0]
    text = "<|start|>user<|message|>Hello, world!<|end|><|start|>assistant"
    assert harmony.encode(text, allow_special=True) == [200006, 1428, 200008, 13225, 11, 2375, 0, 200007, 200006, 173781]


def test_special_tokens_are_text_unless_allowed():
    assert harmony.encode("<|start|>", allow_special=True) == [harmony.START]
    ordinary = harmony.encode("<|start|>", allow_special=False)
    assert harmony.START not in ordinary and harmony.decode(ordinary) == "<|start|>"


@pytest.mark.parametrize(
    "name, token_id",
    [
        ("<|start|>", harmony.START),
        ("<|end|>", harmony.END),
        ("<|message|>", harmony.MESSAGE),
        ("<|channel|>", harmony.CHANNEL),
        ("<|constrain|>", harmony.CONSTRAIN),
        ("<|return|>", harmony.RETURN),
        ("<|call|>", harmony.CALL),
        ("<|endoftext|>", harmony.ENDOFTEXT),
    ],
)
def test_special_token_constants_match_the_encoding(name, token_id):
    enc = harmony.get_encoding()
    assert enc.encode(name, allowed_special="all") == [token_id]
    assert enc.is_special_token(token_id)


def test_stop_tokens_match_the_library():
    assert set(harmony.STOP_TOKENS) == set(harmony.get_encoding().stop_tokens_for_assistant_actions())


def test_is_special_and_vocab_size_match_the_encoding():
    enc = harmony.get_encoding()
    for token_id in [0, 1000, 199997, 199998, 199999, 200000, 200018, harmony.VOCAB_SIZE - 1]:
        assert harmony.is_special(token_id) == enc.is_special_token(token_id), token_id
    harmony.token_bytes(harmony.VOCAB_SIZE - 1)
    with pytest.raises(ValueError):
        harmony.token_bytes(harmony.VOCAB_SIZE)


def test_cached_vocab_file_has_the_official_hash():
    path = harmony.ensure_vocab_file() / tokenizer.VOCAB_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tokenizer.VOCAB_SHA256
    assert tokenizer.VOCAB_SHA256 == "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def test_corrupt_cached_vocab_is_rewritten(tmp_path: Path):
    (tmp_path / tokenizer.VOCAB_FILE).write_bytes(b"tampered")
    harmony.ensure_vocab_file(tmp_path)
    data = (tmp_path / tokenizer.VOCAB_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == tokenizer.VOCAB_SHA256


def test_loading_restores_tiktoken_encodings_base(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", "/somewhere/else")
    tokenizer._load(harmony.ensure_vocab_file(tmp_path))
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == "/somewhere/else"


def test_a_cache_that_cannot_take_the_vocabulary_leaves_nothing_in_the_temporary_folder(tmp_path: Path):
    """Hunt round 18 A-F3: with a cache that cannot be written (a container's read-only root; here OSSRUN_CACHE_DIR
    names a file), every command copied the 3.5 MB vocabulary into two fresh temporary folders, never removed, and
    warned twice. Now one folder a process, removed at exit."""
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "OSSRUN_CACHE_DIR": str(not_a_folder), "TMPDIR": str(temporary)}
    for _ in range(2):
        out = subprocess.run([sys.executable, "-m", "ossrun.cli", "tokenize", "Hello"], capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 0 and out.stdout.strip() == "[13225]", out.stderr
        assert out.stderr.count("cannot take the vocabulary") == 1, out.stderr
    assert list(temporary.iterdir()) == []


_NO_NETWORK_PRELUDE = """
import socket
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
"""


def _offline_run(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `script` with fresh caches, proxies that refuse every connection and Python sockets disabled."""
    proxy = "http://127.0.0.1:9"  # the discard port: connections are refused at once
    env = {
        **os.environ,
        "OSSRUN_CACHE_DIR": str(tmp_path / "ossrun"),
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken"),
        "TIKTOKEN_RS_CACHE_DIR": str(tmp_path / "tiktoken-rs"),
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "http_proxy": proxy,
        "https_proxy": proxy,
        "ALL_PROXY": proxy,
        "NO_PROXY": "",
        "no_proxy": "",
    }
    env.pop("TIKTOKEN_ENCODINGS_BASE", None)
    code = _NO_NETWORK_PRELUDE + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_tokenizer_works_with_the_network_impossible(tmp_path: Path):
    result = _offline_run(
        """
        from ossrun.harmony import encode
        print(encode("<|start|>user<|message|>Hello, world!<|end|><|start|>assistant", allow_special=True))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[200006, 1428, 200008, 13225, 11, 2375, 0, 200007, 200006, 173781]"
    assert (tmp_path / "ossrun" / "tiktoken" / tokenizer.VOCAB_FILE).is_file()


def test_the_offline_check_really_blocks_downloads(tmp_path: Path):
    """Control: in the same environment openai-harmony on its own (which downloads) cannot load."""
    result = _offline_run(
        """
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding
        try:
            load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        except Exception as exc:
            print("failed:", exc)
        else:
            print("loaded")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("failed:")


def _split_character() -> tuple[str, list[int]]:
    """A character whose UTF-8 bytes the tokenizer spreads over several tokens."""
    for char in ["🦜", "🫠", "𓀀", "🧬", "\U0001fae8"]:
        ids = harmony.encode(char)
        if len(ids) > 1:
            return char, ids
    raise AssertionError("no multi-token character found")


def test_text_decoder_never_splits_a_character():
    char, ids = _split_character()
    decoder = harmony.TextDecoder()
    deltas = [decoder.feed(t) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == char
    assert decoder.flush() == ""


def test_text_decoder_flushes_an_incomplete_character_as_replacement():
    _, ids = _split_character()
    decoder = harmony.TextDecoder()
    assert decoder.feed(ids[0]) == ""
    assert decoder.flush() == "\ufffd"
