"""The command line as a user runs it (subprocesses, the tiny model, no network)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from ossrun.engine.engine import Engine, EngineOptions
from ossrun.engine.request import Request, SamplingParams
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.gpt_oss import GptOss


def ossrun(*args: str, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ossrun.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_tokenize_prints_the_harmony_ids():
    assert json.loads(ossrun("tokenize", "Hello, world!").stdout) == [13225, 11, 2375, 0]
    out = ossrun("tokenize", "<|start|>user<|message|>Hello, world!<|end|><|start|>assistant").stdout
    assert json.loads(out) == [200006, 1428, 200008, 13225, 11, 2375, 0, 200007, 200006, 173781]


def test_generate_json_equals_the_engine(checkpoints):
    """`--precision exact` alone means float32 (weights, activations, KV cache): today's exact outputs."""
    result = ossrun("generate", "--model", str(checkpoints["original"]), "--token-ids", "1,2,3", "--max-tokens", "6",
                    "--temperature", "0", "--precision", "exact", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    model = GptOss.from_checkpoint(load_checkpoint(checkpoints["original"]), torch.float32)
    engine = Engine(model, EngineOptions(kv_dtype=torch.float32, kv_cache_bytes=16 * 1024**2, max_model_len=1024))
    events = engine.generate([Request("x", [1, 2, 3], SamplingParams(max_tokens=6, temperature=0))])["x"]
    assert printed["token_ids"] == [e.token_id for e in events]
    assert isinstance(printed["text"], str)


def test_generate_raw_text(checkpoints):
    result = ossrun("generate", "--model", str(checkpoints["hf"]), "--raw", "<|start|>user<|message|>Hi<|end|><|start|>assistant",
                    "--max-tokens", "4", "--temperature", "0", "--precision", "exact", "--dtype", "float32", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) <= 4


def test_make_model_writes_a_loadable_checkpoint(tmp_path):
    result = ossrun("make-model", "--preset", "tiny", "--layout", "hf", "--seed", "3", "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "m").config.num_hidden_layers == 4


def test_download_fails_fast_and_clearly_without_network():
    start = time.monotonic()
    result = ossrun("download", "openai/gpt-oss-20b", env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=120)
    assert result.returncode == 1
    assert "could not download openai/gpt-oss-20b" in result.stderr
    assert time.monotonic() - start < 60


def test_bad_arguments_are_explained():
    result = ossrun("generate", "--token-ids", "1,x")
    assert result.returncode != 0 and "comma-separated" in result.stderr
