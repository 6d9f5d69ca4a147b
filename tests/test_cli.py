"""The command line as a user runs it (subprocesses, the tiny model, no network)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ossrun.engine.engine import Engine, EngineOptions
from ossrun.engine.request import Request, SamplingParams
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.gpt_oss import GptOss
from tests.server_util import free_port, start_server


def ossrun(*args: str, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ossrun.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_python_dash_m_ossrun_is_the_command():
    """`python -m ossrun` said "No module named ossrun.__main__" (round 10)."""
    out = subprocess.run([sys.executable, "-m", "ossrun", "tokenize", "Hello, world!"], capture_output=True, text=True,
                         timeout=180, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [13225, 11, 2375, 0]


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


def test_generate_reads_a_long_prompt_from_a_file_or_stdin(checkpoints, tmp_path):
    """Hunt round 17 C-F2: the prompt options took only the command line, where Linux allows ~128 KiB an argument (about
    22k tokens of text): a long-context prompt could not be given. `@FILE` and `@-` (stdin) read it, as curl's `-d`."""
    raw = "<|start|>user<|message|>Hi<|end|><|start|>assistant"
    (tmp_path / "prompt.txt").write_text(raw)
    (tmp_path / "ids.txt").write_text(",".join(["100000" + " " * 54] * 2_500))  # 150 KB: over one argument's limit
    common = ("generate", "--model", str(checkpoints["original"]), "--max-tokens", "3", "--precision", "exact", "--json")
    inline = ossrun(*common, "--raw", raw)
    from_file = ossrun(*common, "--raw", f"@{tmp_path / 'prompt.txt'}")
    from_stdin = subprocess.run([sys.executable, "-m", "ossrun.cli", *common, "--raw", "@-"], input=raw,
                                capture_output=True, text=True, timeout=180)
    assert inline.returncode == from_file.returncode == from_stdin.returncode == 0, (from_file.stderr, from_stdin.stderr)
    assert json.loads(from_file.stdout) == json.loads(from_stdin.stdout) == json.loads(inline.stdout)
    long = ossrun(*common[:3], "--max-tokens", "1", "--json", "--token-ids", f"@{tmp_path / 'ids.txt'}")
    assert long.returncode == 0 and len(json.loads(long.stdout)["token_ids"]) == 1, long.stderr
    _one_clear_line(ossrun(*common, "--raw", f"@{tmp_path / 'missing.txt'}"), "cannot read the prompt from")


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


def _one_clear_line(result: subprocess.CompletedProcess, expected: str) -> None:
    """A user's mistake: exit status 2 and a line that says what is wrong, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout and "│" not in result.stderr, result.stderr


@pytest.mark.parametrize("model, expected", [("/nonexistent/model", "/nonexistent/model: no such directory"),
                                             ("nosuch", "'nosuch' is neither a directory"),
                                             (os.devnull, "is a file; --model takes a checkpoint directory")])
def test_a_model_that_is_not_there_is_one_line(model, expected, tmp_path):
    _one_clear_line(ossrun("generate", "--model", model, "--token-ids", "1"), expected)
    _one_clear_line(ossrun("serve", "--model", model, "--port", str(free_port()), "--data-dir", str(tmp_path)), expected)


def test_a_directory_without_a_checkpoint_is_one_line(tmp_path):
    _one_clear_line(ossrun("generate", "--model", str(tmp_path), "--token-ids", "1"), "not a gpt-oss checkpoint")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
def test_cuda_on_a_cpu_torch_is_one_line(checkpoints):
    _one_clear_line(ossrun("generate", "--model", str(checkpoints["original"]), "--token-ids", "1", "--device", "cuda"),
                    "this torch")
    _one_clear_line(ossrun("generate", "--model", str(checkpoints["original"]), "--token-ids", "1", "--device", "tpu"),
                    "unknown device 'tpu'")


@pytest.mark.parametrize("args, expected", [(("--token-ids", "999999999"), "outside the vocabulary"),
                                            (("--raw", ""), "the prompt has no tokens"),
                                            (("--token-ids", "1", "--max-tokens", "200000"), "exceeds the context window")])
def test_a_prompt_the_engine_refuses_is_one_line(checkpoints, args, expected):
    _one_clear_line(ossrun("generate", "--model", str(checkpoints["original"]), *args), expected)


def test_sampling_values_out_of_range_are_refused_before_loading():
    """inf and 1e309 (inf to a float) as --temperature sampled a uniformly random answer."""
    for args, expected in ((("--top-p", "2"), "top_p must be in [0, 1]"), (("--top-k", "-1"), "--top-k"),
                           (("--temperature", "inf"), "temperature must be a finite number"),
                           (("--temperature", "1e309"), "temperature must be a finite number"),
                           (("--top-p", "inf"), "top_p must be in [0, 1]")):
        result = ossrun("generate", "--model", "/nonexistent", "--token-ids", "1", *args)
        assert result.returncode == 2 and expected in result.stderr, result.stderr


def test_serve_refuses_bad_settings_before_loading_the_model(checkpoints, tmp_path):
    base = ("serve", "--model", str(checkpoints["original"]), "--data-dir", str(tmp_path))
    for args, expected in ((("--lora", "x"), "--lora takes NAME=DIR"), (("--lora", "x=/nonexistent"), "no such directory"),
                           (("--allowed-origins", "http://a.example,b.example/app"), "--allowed-origins takes origins"),
                           # hunt_edges #2, #4: values that could never match a browser's Origin or a peer's address
                           (("--allowed-origins", "https://*.example.com,http://localhost:3000#top"), "'http://localhost:3000#top'"),
                           (("--forwarded-allow-ips", "127.0.0.1,proxy.internal"), "--forwarded-allow-ips takes IP addresses")):
        _one_clear_line(ossrun(*base, "--port", str(free_port()), *args), expected)
    for args in (("--request-timeout", "-1"), ("--kv-cache-gib", "0"), ("--port", "70000"), ("--rate-limit", "-1"),
                 ("--request-timeout", "nan"), ("--client-timeout", "nan"), ("--kv-cache-gib", "nan"), ("--kv-cache-gib", "inf")):
        result = ossrun(*base, *args)
        assert result.returncode == 2 and "Invalid value" in result.stderr, (args, result.stderr)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf"])
def test_a_keepalive_interval_that_cannot_work_is_one_line_before_the_model_loads(value, tmp_path):
    """Hunt round 18 A-F1, A-F6: OSSRUN_SSE_KEEPALIVE_S=0 (an operator's "off") or -1 starved every stream with endless
    keep-alives at full CPU, its frames never sent; "abc" was a traceback once the model had loaded (minutes for the
    20b). Each is refused at start, before the model (which does not exist here) is looked at."""
    result = ossrun("serve", "--model", "/nonexistent/model", "--port", str(free_port()), "--data-dir", str(tmp_path),
                    env={"OSSRUN_SSE_KEEPALIVE_S": value})
    _one_clear_line(result, f"OSSRUN_SSE_KEEPALIVE_S={value!r}: the keep-alive interval must be a finite number of "
                            "seconds greater than 0")


def test_serve_goes_on_when_its_stdout_is_a_closed_pipe(tmp_path):
    """Hunt round 18 A-F7: `ossrun serve | head -1` ended the server once head had its line: the next write to stdout
    (the banner) raised BrokenPipeError, which click turns into exit status 1 with nothing on stderr. What serve writes
    there is informational: it serves on, and says once on stderr that stdout has gone. Here the pipe's reader is
    closed before the server writes anything."""
    import httpx

    read, write = os.pipe()
    port = free_port()
    errors = tmp_path / "stderr.log"
    server = subprocess.Popen([sys.executable, "-m", "ossrun.cli", "serve", "--port", str(port), "--data-dir",
                               str(tmp_path / "data")], stdout=write, stderr=errors.open("wb"))
    os.close(write)
    os.close(read)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, errors.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert errors.read_text().count("stdout's reader has gone (a closed pipe); serving on without it") == 1
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode == 0 and "Traceback" not in errors.read_text(), errors.read_text()


def test_the_default_request_timeout_answers_before_the_openai_sdk_gives_up():
    """Before (hunt round 16 A-F3): `--request-timeout` defaulted to 600 s, the openai SDKs' own read timeout, which
    fired ~10 ms before the 408 came: the SDK never saw its `x-should-retry: false` and retried twice, each try a whole
    generation, ending in APITimeoutError. Both defaults (the command's and ServerSettings') now end first."""
    import openai
    import typer.main

    from ossrun.cli import app
    from ossrun.serve import ServerSettings

    serve = typer.main.get_command(app).commands["serve"]
    default = next(p.default for p in serve.params if p.name == "request_timeout")
    sdk = openai.DEFAULT_TIMEOUT.read
    assert default == ServerSettings.request_timeout_s and default <= sdk - 30, (default, sdk)


def test_serve_on_a_busy_port_says_so_and_never_claims_to_serve(checkpoints, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = ossrun("serve", "--model", str(checkpoints["original"]), "--port", port, "--data-dir", str(tmp_path), timeout=60)
    _one_clear_line(result, f"cannot listen on 127.0.0.1:{port}")
    assert "serving" not in result.stdout and "loaded" not in result.stdout


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1) to serve on")
def test_the_banner_on_an_ipv6_host_prints_urls_that_work(tmp_path):
    """hunt_proxy #4: `--host ::1` printed `http://::1:PORT` in the serving line, the curl line and the SDK line: curl
    and httpx refuse that URL."""
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ossrun.cli", "serve", "--model", "demo", "--host", "::1", "--port",
                               str(port), "--data-dir", str(tmp_path), "--kv-cache-gib", "0.25"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = iter(server.stdout.readline, "")
        banner = [next(line for line in lines if line.startswith("ossrun serving")), next(lines), next(lines)]
        assert f" at http://[::1]:{port} " in banner[0], banner
        assert f"curl http://[::1]:{port}/client/v4/" in banner[1], banner
        assert f"OpenAI(base_url='http://[::1]:{port}/v1'" in banner[2], banner
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                assert httpx.get(f"http://[::1]:{port}/v1/models", timeout=5).status_code == 200
                break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            pytest.fail("the printed URL never answered")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_kv_cache_too_small_says_how_much_is_needed(checkpoints, tmp_path):
    result = ossrun("serve", "--model", str(checkpoints["original"]), "--kv-cache-gib", "0.00001", "--port", str(free_port()),
                    "--data-dir", str(tmp_path), timeout=120)
    _one_clear_line(result, "needs at least")


def test_serve_refuses_a_lora_name_given_twice_or_taken_by_a_finetune(checkpoints, tmp_path):
    """`--lora dup=A --lora dup=B` served B silently; a `--lora` named like a stored fine-tune made one of the two
    unreachable (the fine-tune won, also for batches queued for the adapter). Both before the model loads."""
    from ossrun.finetunes import FinetuneStore
    from ossrun.model.checkpoint import read_config
    from ossrun.model.lora import write_random_adapter

    config = read_config(checkpoints["original"])
    a = write_random_adapter(config, tmp_path / "a", rank=4, seed=1)
    b = write_random_adapter(config, tmp_path / "b", rank=4, seed=2)
    base = ("serve", "--model", str(checkpoints["original"]), "--data-dir", str(tmp_path / "data"))
    _one_clear_line(ossrun(*base, "--port", str(free_port()), "--lora", f"dup={a}", "--lora", f"dup={b}"), "--lora dup is given twice")
    record = FinetuneStore(tmp_path / "data").create("@cf/openai/gpt-oss-20b", "mine")
    for name in ("mine", record.id.upper()):
        _one_clear_line(ossrun(*base, "--port", str(free_port()), "--lora", f"{name}={a}"), f"--lora {name}: the fine-tune 'mine'")


def test_serve_refuses_a_lora_adapter_with_nan_weights(checkpoints, tmp_path):
    """It started and answered "!!!!" (NaN logits) on every request with the adapter."""
    from safetensors.torch import load_file, save_file

    from ossrun.model.checkpoint import read_config
    from ossrun.model.lora import write_random_adapter

    bad = write_random_adapter(read_config(checkpoints["original"]), tmp_path / "bad", rank=4, seed=1)
    tensors = load_file(bad / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    result = ossrun("serve", "--model", str(checkpoints["original"]), "--data-dir", str(tmp_path / "data"), "--port", str(free_port()),
                    "--lora", f"bad={bad}", timeout=180)
    _one_clear_line(result, "NaN or infinite")


def test_serve_checks_a_lora_adapter_before_it_loads_the_model(checkpoints, tmp_path):
    """Hunt round 13 C-F10: a broken adapter was found only after the model had loaded (minutes for the 20b). Here the
    checkpoint has its config but no weights: a load would fail first, so the adapter's error proves the order."""
    import shutil

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(checkpoints["original"] / "config.json", config_only / "config.json")
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "adapter_config.json").write_text("[1,2")
    result = ossrun("serve", "--model", str(config_only), "--data-dir", str(tmp_path / "data"), "--port", str(free_port()),
                    "--lora", f"foo={unreadable}", timeout=180)
    _one_clear_line(result, "adapter foo: adapter_config.json unreadable")


@pytest.mark.parametrize("args, env", [(("--api-token", ""), {}), (("--api-token", "  "), {}), (("--api-token", " tok"), {}),
                                       ((), {"OSSRUN_API_TOKEN": ""}), ((), {"OSSRUN_API_TOKEN": " "})])
def test_serve_refuses_an_empty_api_token_rather_than_serve_without_one(args, env, tmp_path):
    """An empty token would serve an open API; one with spaces around it a closed one (no client can present it)."""
    result = ossrun("serve", "--model", "/nonexistent", "--data-dir", str(tmp_path), "--port", str(free_port()), *args, env=env)
    assert result.returncode == 2 and "--api-token" in result.stderr and "empty" in result.stderr, result.stderr


@pytest.mark.parametrize("args, env", [(("--api-token", "sécret"), {}), (("--api-token", "tab\there"), {}),
                                       ((), {"OSSRUN_API_TOKEN": "sécret"})])
def test_serve_refuses_an_api_token_no_client_can_present(args, env, tmp_path):
    """Before: `--api-token sécret` started, and the right token sent as UTF-8 (curl in a UTF-8 shell) was a 401 and a
    wrong-token strike (headers are read as Latin-1); the OpenAI SDK could not send it at all."""
    result = ossrun("serve", "--model", "/nonexistent", "--data-dir", str(tmp_path), "--port", str(free_port()), *args, env=env)
    _one_clear_line(result, "printable ASCII characters only")


def test_operator_mistakes_with_the_data_dir_and_checkpoint_are_one_line(checkpoints, tmp_path):
    """As README promises: one line and exit 2, not a traceback (a file where a directory belongs, a broken checkpoint).
    Hunt round 12 C-F6: the data directory's line said "cannot use it (File exists)", mkdir's reason, which reads as if
    existing were the fault; it says the path is a file."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    serve = ("serve", "--port", str(free_port()))
    _one_clear_line(ossrun(*serve, "--model", str(checkpoints["original"]), "--data-dir", str(a_file)),
                    f"--data-dir {a_file}: cannot use it (a file, not a directory)")
    not_json, no_weights = tmp_path / "not-json", tmp_path / "no-weights"
    not_json.mkdir(), no_weights.mkdir()
    (not_json / "config.json").write_text("{oops")
    (no_weights / "config.json").write_text((checkpoints["original"] / "config.json").read_text())
    _one_clear_line(ossrun(*serve, "--model", str(not_json), "--data-dir", str(tmp_path / "d1")), "config.json is not JSON")
    _one_clear_line(ossrun(*serve, "--model", str(no_weights), "--data-dir", str(tmp_path / "d2")), "no .safetensors files")
    _one_clear_line(ossrun("make-model", "--out", str(a_file)), "is a file")


@pytest.mark.parametrize("spoil, expected", [
    (lambda d: (d / "batch.sqlite").write_bytes(os.urandom(8192)), "batch.sqlite cannot be used (file is not a database)"),
    (lambda d: (d / "batch.sqlite").mkdir(), "batch.sqlite cannot be used (unable to open database file)"),
    (lambda d: (d / "finetunes").write_text("x"), "finetunes cannot be used (a file, not a directory)")])
def test_an_unusable_file_in_the_data_dir_is_one_line_before_the_model_loads(spoil, expected, tmp_path):
    """Before: the model loaded (minutes for 20b), then a 65-line traceback and exit 1. The model named here does not
    exist, so the data directory's line shows that it is checked first."""
    data = tmp_path / "data"
    data.mkdir()
    spoil(data)
    _one_clear_line(ossrun("serve", "--model", "/nonexistent/model", "--port", str(free_port()), "--data-dir", str(data)),
                    f"--data-dir {data}: {expected}")


def _serve_with_file_limit(data: Path, limit: int) -> subprocess.CompletedProcess:
    """`serve` on `data` (a model that does not exist) in a process whose files cannot grow past `limit` bytes: a disk
    that refuses writes for real (Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, "-m", "ossrun.cli", "serve", "--model", "/nonexistent/model", "--port",
                           str(free_port()), "--data-dir", str(data)], capture_output=True, text=True, timeout=180,
                          preexec_fn=limited)


def test_a_data_dir_on_a_full_disk_at_start_says_so_and_sends_nobody_to_a_backup(tmp_path):
    """Hunt round 15 A-F5: a data directory whose disk was full at start (SQLite cannot make batch.sqlite's 32 KB WAL
    index) was called corrupt: "move it aside or restore it from a backup", which would throw away every batch and
    response stored since. The file is intact: it says the directory refuses writes. The disk refuses for real: a
    file-size limit below the WAL index's size."""
    from ossrun.batch.store import SQLiteBatchStore

    data = tmp_path / "data"
    store = SQLiteBatchStore(data / "batch.sqlite")
    batch = store.create("m", [{"prompt": "Hi"}])
    store.close()
    result = _serve_with_file_limit(data, 16384)
    _one_clear_line(result, f"--data-dir {data}: the data directory refuses writes (batch.sqlite: disk I/O error); free "
                            "space or fix its permissions")
    assert "backup" not in result.stderr
    store = SQLiteBatchStore(data / "batch.sqlite")  # intact once the disk takes writes
    assert store.get(batch).items[0].body == {"prompt": "Hi"}
    store.close()


def test_a_preset_says_it_is_random_weights_when_written_used_and_served(tmp_path, monkeypatch):
    """Hunt round 18 A-F2: `--model 20b` (beside `ossrun download openai/gpt-oss-20b` in the README) silently wrote
    13.8 GB of random weights into the cache and served noise as @cf/openai/gpt-oss-20b; only an info log said
    "writing the 20b preset". Now the write says its size and what it is, and generate and serve say what a preset
    answers (the tiny preset here: the same path, seconds to write)."""
    monkeypatch.setenv("OSSRUN_CACHE_DIR", str(tmp_path / "cache"))
    warning = ("--model tiny is a preset: random weights for tests and benchmarks, which answer noise (as "
               "@cf/openai/gpt-oss-20b); for the real model run `ossrun download openai/gpt-oss-20b`")
    first = ossrun("generate", "--model", "tiny", "--token-ids", "1", "--max-tokens", "1")
    assert first.returncode == 0, first.stderr
    assert "writing the tiny preset to" in first.stderr and "0.0519 GB of random weights, for tests and benchmarks only" in first.stderr
    assert warning in first.stderr
    server = start_server("tiny", tmp_path / "data")
    try:
        log = server.log.read_text()
    finally:
        server.stop()
    assert "writing the tiny preset" not in log and warning in log
    assert log.index(warning) < log.index("ossrun serving")


def test_a_new_data_dir_on_a_full_disk_is_one_line_naming_the_lock_file(tmp_path):
    """Hunt round 18 A-F6: a new data directory on a full disk was a 34-line traceback from writing `server.lock`'s pid
    (outside the check that reports the directory's other refusals). The disk refuses for real: no file may grow."""
    data = tmp_path / "data"
    _one_clear_line(_serve_with_file_limit(data, 0), f"--data-dir {data}: the data directory refuses writes (server.lock: File too large); free "
                            "space or fix its permissions")


def test_a_kv_cache_size_no_machine_has_is_one_line_before_the_model_loads(tmp_path):
    """Hunt round 18 A-F6: --kv-cache-gib 1e300 passed the finite-number check, then its bytes (1e300 × 2^30) were
    infinite and int() raised OverflowError, a traceback after the model was resolved."""
    result = ossrun("serve", "--model", "/nonexistent/model", "--port", str(free_port()), "--data-dir", str(tmp_path),
                    "--kv-cache-gib", "1e300")
    _one_clear_line(result, "--kv-cache-gib 1e+300 is more memory than any machine has")


def test_a_data_dir_whose_database_another_process_locks_at_start_says_so(tmp_path):
    """With the lock refusals of hunt round 15 A-F2, a start while another process holds batch.sqlite's write lock (an
    operator's sqlite3 shell in a transaction) is one line naming the lock, before the model loads (the model here does
    not exist); it was a traceback after the load."""
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    outside = sqlite3.connect(data / "batch.sqlite", isolation_level=None)
    outside.execute("BEGIN IMMEDIATE")
    try:
        result = ossrun("serve", "--model", "/nonexistent/model", "--port", str(free_port()), "--data-dir", str(data))
    finally:
        outside.close()
    _one_clear_line(result, f"--data-dir {data}: batch.sqlite cannot be written (database is locked: another process has "
                            "held its write lock for over 5 s); end that process's transaction, then start again")


def test_a_fatal_signal_in_the_server_is_explained_on_stderr(checkpoints, tmp_path):
    """Hunt round 15 A-F3: SQLite maps batch.sqlite's WAL index, and a data directory that stops taking writes under
    the running server can end it with SIGBUS: it died with no line at all. The server now has faulthandler on, so
    such a death names the signal and shows every thread's stack (here the signal is sent, as the kernel would)."""
    server = start_server(checkpoints["original"], tmp_path / "data")
    try:
        os.kill(server.process.pid, signal.SIGBUS)
        assert server.process.wait(timeout=30) == -signal.SIGBUS
    finally:
        server.stop()
    log = server.log.read_text()
    assert "Fatal Python error: Bus error" in log and "most recent call first" in log, log[-2000:]


def test_a_kv_cache_larger_than_the_memory_there_is_is_one_line_before_the_model_loads(checkpoints, tmp_path):
    """Before: any --kv-cache-gib started; the cache was allocated after the load, so one the machine cannot hold was a
    100-line traceback and exit 1 (or, with overcommit, a server killed later under load). The cache asked here is
    1e6 GiB, which --max-num-seqs × --max-model-len lets the pools use whole, far above any machine's MemAvailable."""
    result = ossrun("serve", "--model", str(checkpoints["original"]), "--kv-cache-gib", "1e6", "--max-num-seqs", "1000000",
                    "--max-model-len", "131072", "--port", str(free_port()), "--data-dir", str(tmp_path), timeout=120)
    _one_clear_line(result, "--kv-cache-gib 1e+06 plans a KV cache of")
    assert "lower --kv-cache-gib" in result.stderr and "GiB is available" in result.stderr
    assert "loaded" not in result.stdout  # refused before the model loads


def test_a_kv_cache_the_address_space_limit_leaves_no_room_for_is_one_line(checkpoints, tmp_path):
    """Hunt round 13 C-F4: under `ulimit -v 3000000` the default 2 GiB cache passed the check (it compared the cache
    with the whole limit) and the load then failed in a 100-line `OSError: Cannot allocate memory` from the cache's
    mmap. The limit counts every mapping: what the process maps (torch's ~0.7 GiB) and the load will map come off it.
    Here the same limit and cache, on the tiny model."""
    import resource

    def limit_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (3_000_000 * 1024, resource.getrlimit(resource.RLIMIT_AS)[1]))

    with pytest.raises(RuntimeError) as refused:
        start_server(checkpoints["original"], tmp_path / "data", preexec_fn=limit_address_space)
    output = str(refused.value)
    assert output.startswith("server exited (2)"), output
    assert "error: --kv-cache-gib 2 plans a KV cache of" in output and "(ulimit -v, less what the process" in output, output
    assert "Traceback" not in output and "Cannot allocate memory" not in output and "loaded" not in output, output


def test_serve_help_says_what_the_flags_do():
    """Before: --rate-limit said "per token" (without --api-token it counts per client address), --data-dir left out the
    stored Responses and its default, and every flag showed a `<bool>` value that `--json true` refuses."""
    result = ossrun("serve", "--help", env={**os.environ, "COLUMNS": "300"})
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│ --")}
    assert "per client address" in lines["--rate-limit"] and "stored Responses" in lines["--data-dir"]
    assert "[default: (" in lines["--data-dir"]
    assert "<bool>" not in lines["--verbose"]
    generate = ossrun("generate", "--help", env={**os.environ, "COLUMNS": "300"}).stdout
    assert all("<bool>" not in line for line in generate.splitlines() if "--json" in line or "--verbose" in line)


def _help_line(command: str, flag: str) -> str:
    """`ossrun COMMAND --help`'s row for `flag`, wide enough to be one line."""
    result = ossrun(command, "--help", env={**os.environ, "COLUMNS": "300"})
    return next(line for line in result.stdout.splitlines() if line.startswith(f"│ {flag} "))


def test_verbose_says_what_it_adds():
    """Hunt round 12 C-F9: `-v/--verbose` had no help text in serve and generate, and train-demo showed
    `--verbose -v --quiet [default: verbose]`, its `-v` the default and its --quiet with no short name or word."""
    assert "one line per answer" in _help_line("serve", "--verbose") and "traceback" in _help_line("serve", "--verbose")
    assert "model's load" in _help_line("generate", "--verbose") and "traceback" in _help_line("generate", "--verbose")
    train = _help_line("train-demo", "--verbose")
    assert "-q" in train.split() and "loss" in train and "warnings only" in train, train
    refused = ossrun("train-demo", "-q", "--steps", "0")  # -q is taken; --steps 0 is refused, which keeps it fast
    assert refused.returncode == 2 and "--steps" in refused.stderr and "No such option" not in refused.stderr, refused.stderr


def test_make_model_on_a_disk_that_refuses_writes_is_one_line(tmp_path):
    """Before: a traceback (OSError) and exit 1. The disk refuses for real and unprivileged: the command's file-size
    limit is 0 (root ignores a read-only mode bit, not this)."""
    import resource

    def no_file_writes() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    result = subprocess.run([sys.executable, "-m", "ossrun.cli", "make-model", "--out", str(tmp_path / "m")],
                            capture_output=True, text=True, timeout=180, preexec_fn=no_file_writes)
    _one_clear_line(result, f"--out {tmp_path / 'm'}: cannot write the checkpoint (File too large)")


def test_a_file_train_demo_wrote_is_a_model(tmp_path):
    """`ossrun train-demo --out FILE` wrote weights `--model` refused ("is a file"); a compact demo file is expanded
    in the cache as the shipped one is. (A copy of the shipped file: train-demo writes it with the same export.)"""
    from ossrun.model.demo_weights import WEIGHTS_FILE

    compact = tmp_path / "my-demo.safetensors"
    compact.write_bytes(WEIGHTS_FILE.read_bytes())
    result = ossrun("generate", "--model", str(compact), "--raw", "<|start|>user<|message|>Hi<|end|><|start|>assistant",
                    "--max-tokens", "4", "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 4
    not_compact = tmp_path / "other.safetensors"
    not_compact.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    _one_clear_line(ossrun("generate", "--model", str(not_compact), "--token-ids", "1"), "is a file; --model takes")


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path):
    """Hunt round 13 C-F3: a cache that cannot take the demo model or a preset on first use (a read-only home, a
    container's read-only root; here OSSRUN_CACHE_DIR names a file) was a 110-line traceback from serve and generate.
    Text still works: the tokenizer's vocabulary goes to a temporary folder instead."""
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("")
    env = {"OSSRUN_CACHE_DIR": str(not_a_folder)}
    expected = f"{not_a_folder} cannot take it (Not a directory); set OSSRUN_CACHE_DIR"
    _one_clear_line(ossrun("generate", "--prompt", "Hi", env=env), "the demo model is written to the cache on first use")
    _one_clear_line(ossrun("serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "d"), env=env), expected)
    _one_clear_line(ossrun("generate", "--model", "tiny", "--token-ids", "1", env=env), "the tiny preset model is written")
    tokenized = ossrun("tokenize", "Hello", env=env)
    assert tokenized.returncode == 0 and json.loads(tokenized.stdout) == [13225], tokenized.stderr


def test_out_paths_that_cannot_be_written_are_one_line_before_any_work(tmp_path):
    """Hunt round 13 C-F6, C-F7: make-adapter's --out on a file or a missing folder, and train-demo's on a folder or in
    a missing one, were tracebacks; train-demo's came after the whole training run."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    _one_clear_line(ossrun("make-adapter", "--model", "demo", "--out", str(a_file)), f"--out {a_file} is a file")
    started = time.monotonic()
    _one_clear_line(ossrun("train-demo", "-q", "--out", str(tmp_path)), f"--out {tmp_path} is a directory; it takes a file")
    _one_clear_line(ossrun("train-demo", "-q", "--out", str(tmp_path / "no" / "w.safetensors")), "no folder")
    assert time.monotonic() - started < 60  # refused before training (the recipe trains for minutes)


def test_train_demo_does_not_replace_the_shipped_weights_with_another_recipe():
    """Hunt round 13 C-F8: `train-demo --steps 2` (the README's synopsis invites a quick try) silently replaced the
    package's weights with a 2-step model, and `make demo` then spoke gibberish. A different recipe needs --out."""
    from ossrun.model.demo_weights import WEIGHTS_FILE

    before = WEIGHTS_FILE.read_bytes()
    _one_clear_line(ossrun("train-demo", "-q", "--steps", "2"), "would replace the shipped demo weights")
    _one_clear_line(ossrun("train-demo", "-q", "--samples", "5"), "give --out FILE")
    assert WEIGHTS_FILE.read_bytes() == before


def _demo(tmp_path: Path, log: Path, **env: str) -> subprocess.Popen:
    """`make demo` in a process group of its own (signalled as a terminal would), its output in `log`."""
    return subprocess.Popen([sys.executable, "-m", "ossrun.demo"], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OSSRUN_DATA_DIR": str(tmp_path / "data"), **env}, start_new_session=True)


def _wait_for(demo: subprocess.Popen, log: Path, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert demo.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


@pytest.mark.parametrize("server_first", [False, True])
def test_ctrl_c_in_the_demo_stops_it_and_its_server_quietly(tmp_path, server_first):
    """Hunt round 13 C-F2: Ctrl-C in `make demo` (the terminal signals the whole process group: the demo and the server
    it started) printed a uvicorn traceback: the demo sent the server a second SIGINT while it was shutting down.
    Here the demo runs in a process group of its own, which gets the SIGINT as the terminal would send it. With
    `server_first`, the server hears it 0.3 s before the demo, as a busy machine can schedule them: the demo's request
    got the server's 503 first, and the demo ended in a traceback and status 1 (the fresh clone's CI saw it)."""
    log = tmp_path / "demo.log"
    demo = _demo(tmp_path, log)
    try:
        _wait_for(demo, log, "1. A sync answer")  # the server answers /health
        if server_first:
            server = int(subprocess.run(["pgrep", "-P", str(demo.pid)], capture_output=True, text=True).stdout.split()[0])
            os.kill(server, signal.SIGINT)
            time.sleep(0.3)
        os.killpg(demo.pid, signal.SIGINT)
        started = time.monotonic()
        assert demo.wait(timeout=60) == 0, log.read_text()
        assert time.monotonic() - started < 8  # the server was waited for, not terminated after the demo's STOP_S
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)


def test_the_demo_sends_the_token_its_server_requires(tmp_path):
    """Hunt round 18 A-F4: with OSSRUN_API_TOKEN exported (serve's documented variable; the demo's server inherits
    it), the demo's requests sent no token: a 403 and a urllib traceback. Now it sends it, and shows it as serve's
    banner does (the variable, never the value)."""
    log = tmp_path / "demo.log"
    demo = _demo(tmp_path, log, OSSRUN_API_TOKEN="s3cret-token")
    try:
        _wait_for(demo, log, "The playground is at")
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=60) == 0, log.read_text()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Traceback" not in text and "[answer]" in text and '"tool_calls"' in text, text
    assert '-H "Authorization: Bearer $OSSRUN_API_TOKEN"' in text and "api_key=os.environ['OSSRUN_API_TOKEN']" in text
    assert "s3cret-token" not in text


def test_a_demo_interrupted_then_terminated_stops_its_server(tmp_path):
    """Hunt round 18 A-F5: SIGINT to the demo alone (`kill -INT`, an IDE's stop button), then SIGTERM within the demo's
    wait for its server: the SIGTERM's SystemExit ended the wait, and the server ran on, orphaned, holding its port
    and the data directory (the next demo was refused). Now the SIGTERM is passed on and the server is waited for."""
    log = tmp_path / "demo.log"
    demo = _demo(tmp_path, log)
    server = None
    try:
        _wait_for(demo, log, "1. A sync answer")
        server = int(subprocess.run(["pgrep", "-P", str(demo.pid)], capture_output=True, text=True).stdout.split()[0])
        os.kill(demo.pid, signal.SIGINT)
        time.sleep(1)
        os.kill(demo.pid, signal.SIGTERM)
        demo.wait(timeout=30)
        with pytest.raises(ProcessLookupError):  # ended and reaped by the demo
            os.kill(server, 0)
    finally:
        for pid in (demo.pid, server):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_the_demo_does_not_signal_a_server_its_ctrl_c_reached():
    """The demo's side of C-F2: after Ctrl-C the server is waited for, not sent a second SIGINT; otherwise it gets one."""
    from ossrun.demo import stop_server

    class Server:
        def __init__(self):
            self.sent = []

        def poll(self):
            return None

        def send_signal(self, sig):
            self.sent.append(sig)

        def terminate(self):
            self.sent.append(signal.SIGTERM)

        def kill(self):
            self.sent.append(signal.SIGKILL)

        def wait(self, timeout=None):
            return 0

    handler = signal.getsignal(signal.SIGINT)
    try:
        interrupted, ended = Server(), Server()
        stop_server(interrupted, interrupted=True)
        stop_server(ended, interrupted=False)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert interrupted.sent == [] and ended.sent == [signal.SIGINT]
