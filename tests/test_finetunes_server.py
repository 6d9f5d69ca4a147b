"""LoRA fine-tunes through the HTTP routes: create, upload, list, use, survive a restart, and the errors."""

from __future__ import annotations

import json
import socket
import time
import zlib

import httpx
import pytest

from ossrun.api.workers_ai import MAX_FORM_PARTS
from ossrun.finetunes import MAX_CONFIG_BYTES, MAX_DESCRIPTION, MAX_UPLOADS_IN_FLIGHT, FinetuneError, FinetuneStore
from ossrun.model.checkpoint import read_config
from ossrun.model.lora import write_random_adapter
from tests.server_util import MODEL, start_server


def api(server, path: str) -> str:
    return f"{server.base}/client/v4/accounts/acct/ai{path}"


def upload(server, name: str, file_name: str, data: bytes) -> httpx.Response:
    return httpx.post(api(server, f"/finetunes/{name}/finetune-assets"), files={"file": (file_name, data)},
                      data={"file_name": file_name}, timeout=60)


def test_upload_use_list_restart_and_errors(checkpoints, tmp_path):
    adapter = write_random_adapter(read_config(checkpoints["original"]), tmp_path / "adapter", rank=8, seed=3)
    data = tmp_path / "data"
    server = start_server(checkpoints["original"], data)
    try:
        created = httpx.post(api(server, "/finetunes"), json={"model": MODEL, "name": "pirate", "description": "arr"}).json()
        assert created["success"] and created["result"]["name"] == "pirate"
        finetune_id = created["result"]["id"]
        assert httpx.post(api(server, "/finetunes"), json={"model": MODEL, "name": "pirate"}).status_code == 400  # duplicate name

        half = upload(server, "pirate", "adapter_config.json", (adapter / "adapter_config.json").read_bytes())
        assert half.status_code == 200
        not_ready = httpx.post(server.run_url(), json={"prompt": "hi", "lora": "pirate", "max_tokens": 3})
        assert not_ready.status_code == 400 and not_ready.json()["errors"][0]["code"] == 3039  # missing files
        assert "adapter_model.safetensors" in not_ready.text

        missing = httpx.post(api(server, "/finetunes/pirate/finetune-assets"), data={"file_name": "adapter_model.safetensors"})
        assert missing.status_code == 400 and missing.json()["errors"][0]["code"] == 3039
        wrong_name = upload(server, "pirate", "weights.bin", b"123")
        assert wrong_name.status_code == 400 and wrong_name.json()["errors"][0]["code"] == 3039

        assert upload(server, finetune_id, "adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes()).status_code == 200
        listed = httpx.get(api(server, "/finetunes")).json()["result"]
        assert [f["name"] for f in listed] == ["pirate"]

        body = {"prompt": "Tell me a story", "max_tokens": 8, "temperature": 0}
        base = httpx.post(server.run_url(), json=body, timeout=60).json()["result"]["response"]
        by_name = httpx.post(server.run_url(), json={**body, "lora": "pirate"}, timeout=60).json()["result"]["response"]
        by_id = httpx.post(server.run_url(), json={**body, "lora": finetune_id}, timeout=60).json()["result"]["response"]
        assert by_name == by_id != base
        messages = httpx.post(server.run_url(), json={"messages": [{"role": "user", "content": "Tell me a story"}], "lora": "pirate",
                                                       "max_tokens": 8, "temperature": 0}, timeout=60)
        assert messages.status_code == 200  # beyond the hosted API: lora on Messages too
        unknown = httpx.post(server.run_url(), json={**body, "lora": "nobody"})
        assert unknown.status_code == 400 and unknown.json()["errors"][0]["code"] == 5005
    finally:
        server.stop()

    server = start_server(checkpoints["original"], data)  # fine-tunes live in the data dir
    try:
        again = httpx.post(server.run_url(), json={**body, "lora": "pirate"}, timeout=60).json()["result"]["response"]
        assert again == by_name
    finally:
        server.stop()


def test_preloaded_adapter_and_bad_adapter_upload(checkpoints, tmp_path):
    config = read_config(checkpoints["original"])
    good = write_random_adapter(config, tmp_path / "good", rank=4, seed=1)
    server = start_server(checkpoints["original"], tmp_path / "data", "--lora", f"preloaded={good}")
    try:
        ok = httpx.post(server.run_url(), json={"input": "hi", "lora": "preloaded", "max_output_tokens": 4}, timeout=60)
        assert ok.status_code == 200
        httpx.post(api(server, "/finetunes"), json={"model": MODEL, "name": "broken"})
        upload(server, "broken", "adapter_config.json", b'{"peft_type": "LORA", "r": 64, "lora_alpha": 8, "target_modules": ["q_proj"]}')
        bad = upload(server, "broken", "adapter_model.safetensors", (good / "adapter_model.safetensors").read_bytes())
        assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == 5005 and "rank 64" in bad.text
    finally:
        server.stop()


def test_a_preloaded_adapter_does_not_read_its_files_again(checkpoints, tmp_path):
    """Hunt round 19 C-F1. Before: a `--lora` adapter was served through a memory map of the operator's file, so
    rewriting it in place (`cp`, a trainer saving into the same folder) changed the served weights under the same
    adapter version (mixing them with its cached KV), and truncating it killed the server with SIGBUS. Now its
    tensors are read into the server's memory once, at start: the files may change, the answers do not."""
    import shutil

    config = read_config(checkpoints["original"])
    live = tmp_path / "live"
    shutil.copytree(write_random_adapter(config, tmp_path / "first", rank=4, seed=1), live)
    other = write_random_adapter(config, tmp_path / "second", rank=4, seed=2)
    server = start_server(checkpoints["original"], tmp_path / "data", "--lora", f"live={live}", "--lora", f"other={other}")
    body = {"prompt": "Tell me a story about a lighthouse keeper and the sea", "max_tokens": 6, "temperature": 0}

    def answer(lora: str = "live") -> str:
        response = httpx.post(server.run_url(), json={**body, "lora": lora}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["result"]["response"]

    try:
        before = answer()
        assert answer("other") != before  # the rewrite below would show
        with open(live / "adapter_model.safetensors", "wb") as f:  # in place: same inode, truncated, rewritten
            f.write((other / "adapter_model.safetensors").read_bytes())
        assert answer() == before
        with open(live / "adapter_model.safetensors", "r+b") as f:
            f.truncate(100)
        assert answer() == before
        assert server.process.poll() is None
    finally:
        server.stop()


def create(server, name: str) -> httpx.Response:
    return httpx.post(api(server, "/finetunes"), json={"model": MODEL, "name": name}, timeout=60)


def test_an_id_names_exactly_one_finetune(checkpoints, tmp_path):
    """A name equal to another fine-tune's id (or shaped like an id) is refused; an id is resolved before any name,
    also over data written before names were checked (an impostor folder on disk, seen after a restart)."""
    import json
    import uuid

    config = read_config(checkpoints["original"])
    victim_adapter = write_random_adapter(config, tmp_path / "victim", rank=4, seed=5)
    impostor_adapter = write_random_adapter(config, tmp_path / "impostor", rank=4, seed=6)
    data = tmp_path / "data"
    body = {"prompt": "Tell me a story", "max_tokens": 8, "temperature": 0}
    server = start_server(checkpoints["original"], data)
    try:
        victim_id = create(server, "victim").json()["result"]["id"]
        for name in (victim_id, str(uuid.uuid4()), str(uuid.uuid4()).upper()):
            refused = create(server, name)
            assert refused.status_code == 400 and refused.json()["errors"][0]["code"] == 5006, name
        assert [f["name"] for f in httpx.get(api(server, "/finetunes")).json()["result"]] == ["victim"]
    finally:
        server.stop()

    # An impostor named after the victim's id, as an older server let one be created, complete and loadable.
    impostor = data / "finetunes" / str(uuid.uuid4())
    impostor.mkdir()
    meta = json.loads((data / "finetunes" / victim_id / "meta.json").read_text())
    (impostor / "meta.json").write_text(json.dumps({**meta, "id": impostor.name, "name": victim_id}))
    for file_name in ("adapter_config.json", "adapter_model.safetensors"):
        (impostor / file_name).write_bytes((impostor_adapter / file_name).read_bytes())

    server = start_server(checkpoints["original"], data)
    try:
        for file_name in ("adapter_config.json", "adapter_model.safetensors"):
            stored = upload(server, victim_id, file_name, (victim_adapter / file_name).read_bytes())
            assert stored.status_code == 200 and stored.json()["result"]["id"] == victim_id
        assert (data / "finetunes" / victim_id / "adapter_model.safetensors").exists()
        by_name = httpx.post(server.run_url(), json={**body, "lora": "victim"}, timeout=60).json()["result"]["response"]
        by_id = httpx.post(server.run_url(), json={**body, "lora": victim_id}, timeout=60).json()["result"]["response"]
        by_impostor_id = httpx.post(server.run_url(), json={**body, "lora": impostor.name}, timeout=60).json()["result"]["response"]
        assert by_id == by_name != by_impostor_id
    finally:
        server.stop()


def test_a_refused_upload_leaves_the_finetune_as_it_was(checkpoints, tmp_path):
    """Garbage over a working adapter, or a bad config, is a 400 and changes nothing: the fine-tune still answers the
    same after a restart (the files on disk are what a restart loads). A config that is not a JSON object is
    refused at its own upload, even before the weights are there."""
    config = read_config(checkpoints["original"])
    adapter = write_random_adapter(config, tmp_path / "adapter", rank=8, seed=7)
    data = tmp_path / "data"
    body = {"prompt": "Tell me a story", "max_tokens": 8, "temperature": 0, "lora": "good"}
    server = start_server(checkpoints["original"], data)
    try:
        assert create(server, "good").status_code == 200
        for file_name in ("adapter_config.json", "adapter_model.safetensors"):
            assert upload(server, "good", file_name, (adapter / file_name).read_bytes()).status_code == 200
        before = httpx.post(server.run_url(), json=body, timeout=60).json()["result"]["response"]
        stored = {p.name: p.read_bytes() for p in (data / "finetunes").glob("*/adapter_*")}

        refusals = [("adapter_model.safetensors", bytes(range(256)) * 4),
                    ("adapter_config.json", b'{"bad": json'),
                    ("adapter_config.json", b"[1, 2]"),
                    ("adapter_config.json", b'{"peft_type": "LORA", "r": 64, "target_modules": ["q_proj"]}')]
        for file_name, data_bytes in refusals:
            refused = upload(server, "good", file_name, data_bytes)
            assert refused.status_code == 400 and refused.json()["errors"][0]["code"] == 5005, (file_name, data_bytes)
        assert {p.name: p.read_bytes() for p in (data / "finetunes").glob("*/adapter_*")} == stored
        assert httpx.post(server.run_url(), json=body, timeout=60).json()["result"]["response"] == before

        half = create(server, "half").json()["result"]["id"]
        for config_bytes in (b'{"bad": json', b'"a string"', b"\xff\xfe"):
            refused = upload(server, "half", "adapter_config.json", config_bytes)
            assert refused.status_code == 400 and refused.json()["errors"][0]["code"] == 5005, config_bytes
        assert sorted(p.name for p in (data / "finetunes" / half).iterdir()) == ["meta.json"]  # no staging left either
    finally:
        server.stop()

    server = start_server(checkpoints["original"], data)
    try:
        assert httpx.post(server.run_url(), json=body, timeout=60).json()["result"]["response"] == before
    finally:
        server.stop()


def test_a_finetune_changes_rank_in_two_uploads_and_each_version_gets_its_own_kv(checkpoints, tmp_path):
    """Retraining at another rank: each file was checked against the other one as stored, so neither upload order
    could ever replace a rank-8 pair by a rank-4 one. Now the first file waits (200, with a message) while the old
    pair keeps serving, and the second completes the new pair. Each new pair is a new adapter version: answers equal
    the same weights preloaded (a re-upload reused the prefix KV of the old weights), and a NaN upload is refused."""
    import json

    from safetensors.torch import load_file, save_file

    config = read_config(checkpoints["original"])
    r8 = write_random_adapter(config, tmp_path / "r8", rank=8, seed=3)
    r4 = write_random_adapter(config, tmp_path / "r4", rank=4, seed=4)
    server = start_server(checkpoints["original"], tmp_path / "data", "--lora", f"r8={r8}", "--lora", f"r4={r4}")
    body = {"prompt": "Once upon a time, in a land far away, there lived a king who had three daughters", "max_tokens": 8,
            "temperature": 0}

    def answer(lora: str) -> str:
        response = httpx.post(server.run_url(), json={**body, "lora": lora}, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["result"]["response"]

    def send(folder, file_name: str, data: bytes | None = None) -> httpx.Response:
        return upload(server, "ft", file_name, (folder / file_name).read_bytes() if data is None else data)

    try:
        want8, want4 = answer("r8"), answer("r4")
        assert want8 != want4
        assert create(server, "ft").status_code == 200
        for file_name in ("adapter_config.json", "adapter_model.safetensors"):
            assert send(r8, file_name).status_code == 200
        assert answer("ft") == want8

        waits = send(r4, "adapter_config.json")
        assert waits.status_code == 200 and "waits" in waits.json()["messages"][0]["message"], waits.text
        assert answer("ft") == want8  # the complete old pair still serves
        done = send(r4, "adapter_model.safetensors")
        assert done.status_code == 200 and done.json()["messages"] == []
        assert answer("ft") == want4

        assert send(r8, "adapter_model.safetensors").json()["messages"]  # the other order
        assert send(r8, "adapter_config.json").json()["messages"] == []
        assert answer("ft") == want8

        tensors = load_file(r8 / "adapter_model.safetensors")
        next(iter(tensors.values()))[0, 0] = float("nan")
        save_file(tensors, tmp_path / "nan.safetensors")
        nan = send(r8, "adapter_model.safetensors", (tmp_path / "nan.safetensors").read_bytes())
        assert nan.status_code == 400 and "NaN" in nan.text, nan.text
        alpha = send(r8, "adapter_config.json", json.dumps({**json.loads((r8 / "adapter_config.json").read_text()),
                                                           "lora_alpha": 1e308}).encode())
        assert alpha.status_code == 400 and "lora_alpha" in alpha.text, alpha.text
        assert answer("ft") == want8
    finally:
        server.stop()


def test_a_finetune_changes_its_target_modules_in_two_uploads(checkpoints, tmp_path):
    """Hunt round 19 C-F4. Before: a config and tensors that disagree on the modules adapted were served as the
    tensors say (PEFT follows the config). Now such a pair is not served: as a pair of two ranks, a file that does
    not fit the stored other file waits for the one that does, the old pair serving meanwhile."""
    config = read_config(checkpoints["original"])
    full = write_random_adapter(config, tmp_path / "full", rank=4, seed=3)
    qv = write_random_adapter(config, tmp_path / "qv", rank=4, seed=4, targets=("q_proj", "v_proj"))
    server = start_server(checkpoints["original"], tmp_path / "data", "--lora", f"full={full}", "--lora", f"qv={qv}")
    body = {"prompt": "Once upon a time, in a land far away", "max_tokens": 8, "temperature": 0}

    def answer(lora: str) -> httpx.Response:
        return httpx.post(server.run_url(), json={**body, "lora": lora}, timeout=120)

    def send(name: str, folder, file_name: str) -> httpx.Response:
        return upload(server, name, file_name, (folder / file_name).read_bytes())

    try:
        want_full, want_qv = answer("full").json()["result"]["response"], answer("qv").json()["result"]["response"]
        assert want_full != want_qv
        assert create(server, "ft").status_code == 200
        assert [send("ft", full, name).status_code for name in ("adapter_config.json", "adapter_model.safetensors")] == [200, 200]
        waits = send("ft", qv, "adapter_config.json")
        assert waits.status_code == 200 and "waits" in waits.json()["messages"][0]["message"], waits.text
        assert answer("ft").json()["result"]["response"] == want_full
        assert send("ft", qv, "adapter_model.safetensors").json()["messages"] == []
        assert answer("ft").json()["result"]["response"] == want_qv

        assert create(server, "mixed").status_code == 200  # qv's config with full's tensors: never served
        assert send("mixed", qv, "adapter_config.json").status_code == 200
        assert send("mixed", full, "adapter_model.safetensors").json()["messages"], "served a pair that disagrees"
        refused = answer("mixed")
        assert refused.status_code == 400 and "waits" in refused.json()["errors"][0]["message"], refused.text
    finally:
        server.stop()


# -- hunt_security #5: uploads stream to disk, and only MAX_UPLOADS_IN_FLIGHT at once ------------------------

def proc_kib(pid: int, field: str) -> int:
    """`VmRSS`, `VmHWM`, … of a process, in KiB (Linux `/proc/PID/status`)."""
    line = next(line for line in open(f"/proc/{pid}/status") if line.startswith(field + ":"))
    return int(line.split()[1])


def uploads_arriving(server) -> list:
    folder = server.data_dir / "finetunes" / ".uploads"
    return list(folder.iterdir()) if folder.exists() else []


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def upload_server(checkpoints, tmp_path_factory):
    server = start_server(checkpoints["original"], tmp_path_factory.mktemp("uploads") / "data")
    assert create(server, "big").status_code == 200 and create(server, "small").status_code == 200
    yield server
    server.stop()


def test_public_is_kept_answered_and_listed(upload_server):
    """Before: `public` (Cloudflare's create field; its SDKs type the answer's `public: bool` as required) was
    dropped without a word and `GET …/finetunes/public` was a 404 (hunt_cf #3)."""
    made = httpx.post(api(upload_server, "/finetunes"), json={"model": MODEL, "name": "shared", "public": True}, timeout=30)
    assert made.status_code == 200 and made.json()["result"]["public"] is True
    listed = {f["name"]: f["public"] for f in httpx.get(api(upload_server, "/finetunes"), timeout=30).json()["result"]}
    assert listed["shared"] is True and listed["big"] is False
    public = httpx.get(api(upload_server, "/finetunes/public"), timeout=30).json()["result"]
    assert [f["name"] for f in public] == ["shared"]
    refused = httpx.post(api(upload_server, "/finetunes"), json={"model": MODEL, "name": "odd", "public": "yes"}, timeout=30)
    assert refused.status_code == 400 and "public" in refused.json()["errors"][0]["message"]


def test_a_large_upload_goes_to_disk_as_it_arrives_not_into_memory(upload_server, tmp_path):
    """Before: the route read the whole upload into one `bytes`, so every upload in flight added its size to the
    server's memory (4 × 250 MB: +1 GB). Now it is written to a file in the data directory as it arrives and moved
    into place: the server's peak RSS (reset just before) grows by a few MB for a 160 MB upload, the stored file is
    the one sent, and nothing is left in the staging folder, nor after a refused upload. A config is parsed whole,
    so it has a limit of its own (1 MB)."""
    size = 160 * 2**20
    sent = tmp_path / "adapter_model.safetensors"
    sent.write_bytes(bytes(range(256)) * (size // 256))
    pid = upload_server.process.pid
    before = proc_kib(pid, "VmRSS")
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS now
    with sent.open("rb") as f:
        stored = httpx.post(api(upload_server, "/finetunes/big/finetune-assets"), data={"file_name": sent.name},
                            files={"file": (sent.name, f)}, timeout=120)
    grew_mib = (proc_kib(pid, "VmHWM") - before) / 1024
    assert stored.status_code == 200, stored.text
    assert grew_mib < 32, f"peak RSS grew by {grew_mib:.0f} MiB for a {size // 2**20} MiB upload"
    finetune = upload_server.data_dir / "finetunes" / stored.json()["result"]["id"]
    assert (finetune / sent.name).stat().st_size == size and (finetune / sent.name).read_bytes() == sent.read_bytes()
    assert uploads_arriving(upload_server) == []
    refused = upload(upload_server, "big", "adapter_config.json", b"[1, 2]")
    assert refused.status_code == 400 and uploads_arriving(upload_server) == []
    too_big = upload(upload_server, "big", "adapter_config.json", b" " * MAX_CONFIG_BYTES + b"{}")  # parsed whole: capped
    assert too_big.status_code == 413 and too_big.json()["errors"][0]["code"] == 3006 and uploads_arriving(upload_server) == []


def gzipped_form(file_name: str, data: bytes, boundary: str = "b") -> bytes:
    """A multipart upload of `data` as `file_name`, gzip-compressed whole (the body sent with Content-Encoding: gzip)."""
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file_name"\r\n\r\n{file_name}\r\n--{boundary}\r\n'
            f'Content-Disposition: form-data; name="file"; filename="{file_name}"\r\n\r\n').encode()
    stream = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join([stream.compress(head), stream.compress(data), stream.compress(f"\r\n--{boundary}--\r\n".encode()),
                     stream.flush()])


def test_a_gzipped_upload_is_decoded_in_bounded_pieces(upload_server):
    """Before: each network chunk of a gzip-encoded body was decoded whole, so a 200 kB gzip of a 200 MB upload made
    the server's peak RSS grow by hundreds of MB (compressed data inflates a thousandfold). Now the decoded bytes are
    handed on a MB at a time: the peak grows by a few MB, and the stored file is the one sent."""
    size = 200 * 2**20
    data = bytes(size)
    body = gzipped_form("adapter_model.safetensors", data)
    assert len(body) < size // 500
    assert create(upload_server, "gzipped").status_code == 200
    pid = upload_server.process.pid
    before = proc_kib(pid, "VmRSS")
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS now
    stored = httpx.post(api(upload_server, "/finetunes/gzipped/finetune-assets"), content=body, timeout=120,
                        headers={"Content-Type": "multipart/form-data; boundary=b", "Content-Encoding": "gzip"})
    grew_mib = (proc_kib(pid, "VmHWM") - before) / 1024
    assert stored.status_code == 200, stored.text
    assert grew_mib < 32, f"peak RSS grew by {grew_mib:.0f} MiB for a {len(body) // 1024} kB gzip of {size // 2**20} MiB"
    kept = upload_server.data_dir / "finetunes" / stored.json()["result"]["id"] / "adapter_model.safetensors"
    assert kept.stat().st_size == size and kept.read_bytes() == data
    assert uploads_arriving(upload_server) == []


def partial_upload(server, length: int, name: str = "big", file_name: str = "adapter_model.safetensors") -> socket.socket:
    """An upload whose first bytes are sent and the rest of its `length` never: it stays in flight."""
    head = (f'--b\r\nContent-Disposition: form-data; name="file_name"\r\n\r\n{file_name}\r\n'.encode() +
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n' + b"x" * 100_000)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(f"POST /client/v4/accounts/acct/ai/finetunes/{name}/finetune-assets HTTP/1.1\r\nHost: localhost\r\n"
                 f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n\r\n".encode() + head)
    return sock


def test_uploads_in_flight_are_bounded_and_one_whose_client_leaves_leaves_nothing(upload_server):
    """Before: any number of uploads could be in flight at once, each holding its size in memory. Now a third one
    while two are arriving is a 429 (3040) with `Retry-After`, before its body is read; a client that leaves
    mid-upload frees its place, and its partial file is removed."""
    config = b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}'
    slow = [partial_upload(upload_server, 10 * 2**20) for _ in range(MAX_UPLOADS_IN_FLIGHT)]
    try:
        wait_for(lambda: len(uploads_arriving(upload_server)) == MAX_UPLOADS_IN_FLIGHT)
        busy = upload(upload_server, "small", "adapter_config.json", config)
        assert busy.status_code == 429 and busy.json()["errors"][0]["code"] == 3040, busy.text
        assert int(busy.headers["Retry-After"]) > 0
    finally:
        for sock in slow:
            sock.close()
    assert wait_for(lambda: uploads_arriving(upload_server) == []), uploads_arriving(upload_server)
    assert wait_for(lambda: upload(upload_server, "small", "adapter_config.json", config).status_code == 200)


def test_a_finetune_whose_meta_json_is_damaged_is_set_aside_with_a_warning(checkpoints, tmp_path):
    """Before: a fine-tune whose meta.json was damaged (a disk error, a hand edit) vanished from every listing without
    a word in the log, and its name could be taken again over the orphaned folder."""
    data = tmp_path / "data"
    server = start_server(checkpoints["original"], data)
    try:
        finetune_id = create(server, "ft1").json()["result"]["id"]
    finally:
        server.stop()
    folder = data / "finetunes" / finetune_id
    (folder / "meta.json").write_text('{"id": "x"')
    server = start_server(checkpoints["original"], data)
    try:
        assert httpx.get(api(server, "/finetunes")).json()["result"] == []  # skipped, not fatal
    finally:
        server.stop()
    warnings = [line for line in server.log.read_text().splitlines() if "WARNING" in line and "set aside" in line]
    assert len(warnings) == 1 and str(folder) in warnings[0] and "meta.json is unreadable" in warnings[0], warnings


def test_a_finetune_whose_meta_json_has_a_field_of_the_wrong_type_is_set_aside_with_a_warning(checkpoints, tmp_path):
    """Hunt round 18 B-F2: a meta.json edited by hand with a field of the wrong type (`created_at` null or an epoch, an
    `id` number) stopped the server at start (sorting by creation, or lowering the id, raised), after the model had
    loaded; a `name` number was listed and a `public` string counted as true. Each field is now checked by type as the
    file is read: such a folder is set aside as a damaged one is, the others served."""
    data = tmp_path / "data"
    edits = {"created-null": ("created_at", None), "created-epoch": ("created_at", 1733000000), "id-number": ("id", 123),
             "name-number": ("name", 5), "public-string": ("public", "false"), "description-list": ("description", ["x"])}
    server = start_server(checkpoints["original"], data)
    try:
        ids = {name: create(server, name).json()["result"]["id"] for name in ["kept", *edits]}
    finally:
        server.stop()
    for name, (field, value) in edits.items():
        meta = data / "finetunes" / ids[name] / "meta.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), field: value}))
    server = start_server(checkpoints["original"], data)
    try:
        assert [f["name"] for f in httpx.get(api(server, "/finetunes")).json()["result"]] == ["kept"]
        assert create(server, "created-null").status_code == 200  # its name is free again, as the warning says
    finally:
        server.stop()
    warnings = [line for line in server.log.read_text().splitlines() if "WARNING" in line and "set aside" in line]
    for name, (field, _) in edits.items():
        (warning,) = [line for line in warnings if ids[name] in line]
        assert "meta.json is unreadable" in warning and field in warning, warning
    assert len(warnings) == len(edits) and "Traceback" not in server.log.read_text()


def test_a_finetune_whose_stored_files_do_not_load_says_why_to_the_client(checkpoints, tmp_path):
    """Before: a stored pair that did not load at start (two ranks, what a crash between the two renames of a rank
    change would leave; a truncated file) answered "missing a valid adapter", and only the log had the reason."""
    config = read_config(checkpoints["original"])
    rank8 = write_random_adapter(config, tmp_path / "rank8", rank=8, seed=3)
    rank16 = write_random_adapter(config, tmp_path / "rank16", rank=16, seed=3)
    data = tmp_path / "data"
    server = start_server(checkpoints["original"], data)
    try:
        finetune_id = create(server, "ft1").json()["result"]["id"]
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert upload(server, "ft1", name, (rank8 / name).read_bytes()).status_code == 200
    finally:
        server.stop()
    (data / "finetunes" / finetune_id / "adapter_config.json").write_bytes((rank16 / "adapter_config.json").read_bytes())
    server = start_server(checkpoints["original"], data)
    try:
        refused = httpx.post(server.run_url(), json={"prompt": "hi", "lora": "ft1", "max_tokens": 3}, timeout=60)
        assert refused.status_code == 400 and refused.json()["errors"][0]["code"] == 5005
        message = refused.json()["errors"][0]["message"]
        assert "its stored files did not load" in message and "r=16" in message and "upload them again" in message, message
        assert upload(server, "ft1", "adapter_config.json", (rank8 / "adapter_config.json").read_bytes()).status_code == 200
        assert httpx.post(server.run_url(), json={"prompt": "hi", "lora": "ft1", "max_tokens": 3}, timeout=60).status_code == 200
    finally:
        server.stop()


def test_the_finetune_routes_answer_the_documented_trailing_slash(upload_server):
    """Before: Cloudflare's LoRA page's curl commands (`POST …/ai/finetunes/`, `GET …/ai/finetunes/`,
    `POST …/finetunes/{id}/finetune-assets/`) were 404 7000 here (hunt round 12 A-F1). Served as they are, no
    redirect (a redirected POST loses its body in many clients); other routes stay exact."""
    made = httpx.post(api(upload_server, "/finetunes/"), json={"model": MODEL, "name": "slashed"}, timeout=30)
    assert made.status_code == 200 and made.json()["result"]["name"] == "slashed", made.text
    assert "slashed" in [f["name"] for f in httpx.get(api(upload_server, "/finetunes/"), timeout=30).json()["result"]]
    assert httpx.get(api(upload_server, "/finetunes/public/"), timeout=30).status_code == 200
    stored = httpx.post(api(upload_server, "/finetunes/slashed/finetune-assets/"), timeout=30,
                        files={"file": ("adapter_config.json", b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}')},
                        data={"file_name": "adapter_config.json"})
    assert stored.status_code == 200, stored.text
    other = httpx.get(api(upload_server, "/models/search/"), timeout=30)
    assert other.status_code == 404 and other.json()["errors"][0]["code"] == 7000


def test_a_finetune_missing_its_files_is_3039(upload_server):
    """Before: 5005, the hosted code for "this model does not support LoRA"; the hosted errors page and the contract
    (§7) give "Finetune is missing required files" 3039, HTTP 400 (hunt round 12 A-F3). An unknown one stays 5005."""
    assert create(upload_server, "empty").status_code == 200
    for body in ({"prompt": "hi", "lora": "empty", "max_tokens": 3}, {"input": "hi", "lora": "empty", "max_output_tokens": 3}):
        refused = httpx.post(upload_server.run_url(), json=body, timeout=60)
        assert refused.status_code == 400, refused.text
        error = refused.json()["errors"][0]
        assert error["code"] == 3039 and "adapter_config.json, adapter_model.safetensors" in error["message"], error
    queued = httpx.post(upload_server.run_url(), params={"queueRequest": "true"}, timeout=60,
                        json={"requests": [{"prompt": "hi", "max_tokens": 2}, {"prompt": "hi", "lora": "empty", "max_tokens": 2}]})
    assert queued.status_code == 400 and queued.json()["errors"][0]["code"] == 3039 and "requests[1]" in queued.text
    unknown = httpx.post(upload_server.run_url(), json={"prompt": "hi", "lora": "nobody", "max_tokens": 3}, timeout=60)
    assert unknown.status_code == 400 and unknown.json()["errors"][0]["code"] == 5005


def test_public_finetunes_are_paged_and_ordered_as_cloudflare_asks(upload_server):
    """Before: `limit`, `offset` and `order_by` (what Cloudflare's SDKs send to `ai.finetunes.public.list`) were
    ignored, so a client paging by offset re-read the whole list forever (hunt round 12 A-F10)."""
    for name in ("pub-c", "pub-a", "pub-b"):
        made = httpx.post(api(upload_server, "/finetunes"), json={"model": MODEL, "name": name, "public": True}, timeout=30)
        assert made.status_code == 200, made.text

    def names(**params) -> list[str]:
        answer = httpx.get(api(upload_server, "/finetunes/public"), params=params, timeout=30)
        assert answer.status_code == 200, answer.text
        return [f["name"] for f in answer.json()["result"] if f["name"].startswith("pub-")]

    everything = names()
    assert sorted(everything) == ["pub-a", "pub-b", "pub-c"]
    assert names(order_by="name") == ["pub-a", "pub-b", "pub-c"]
    public = [f["name"] for f in httpx.get(api(upload_server, "/finetunes/public"), params={"order_by": "name"}, timeout=30).json()["result"]]
    paged, offset = [], 0
    while page := [f["name"] for f in httpx.get(api(upload_server, "/finetunes/public"), timeout=30,
                                                params={"order_by": "name", "limit": 2, "offset": offset}).json()["result"]]:
        assert len(page) <= 2
        paged, offset = paged + page, offset + 2
    assert paged == public
    assert names(order_by="name", limit=1, offset=1) == ["pub-b"]
    assert names(limit=2, offset=100) == []
    for params in ({"limit": 0}, {"offset": -1}, {"order_by": "colour"}, {"limit": "many"}):
        refused = httpx.get(api(upload_server, "/finetunes/public"), params=params, timeout=30)
        assert refused.status_code == 400 and refused.json()["errors"][0]["code"] == 5006, (params, refused.text)


CONFIG = b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}'


def form(*parts: tuple[str, bytes], closed: bool = True) -> bytes:
    """A multipart body (boundary `b`) of (name, value) parts, ending with its closing boundary when `closed`."""
    body = b"".join(b'--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (name.encode(), value)
                    for name, value in parts)
    return body + (b"--b--\r\n" if closed else b"")


def post_form(server, name: str, body: bytes) -> httpx.Response:
    return httpx.post(api(server, f"/finetunes/{name}/finetune-assets"), content=body, timeout=60,
                      headers={"Content-Type": "multipart/form-data; boundary=b"})


def test_a_form_of_many_parts_is_refused_and_unread_fields_are_not_kept(upload_server):
    """Hunt round 15 B-F6. Before: every part's field was kept whatever its name, so a body of 4.5 million empty fields
    held 290 MB while it was parsed on the event loop (44 s), and was then stored as a valid upload. Now the route
    keeps only `file_name`, and a form of more than 16 parts is a 400 (3039) as soon as the 17th begins; a few fields
    it does not read beside the two it does are still an upload."""
    assert create(upload_server, "parts").status_code == 200
    extra = [(f"note{i}", b"x") for i in range(MAX_FORM_PARTS - 2)]
    kept = post_form(upload_server, "parts", form(*extra, ("file_name", b"adapter_config.json"), ("file", CONFIG)))
    assert kept.status_code == 200, kept.text
    many = [(f"f{i}", b"") for i in range(100_000)]
    refused = post_form(upload_server, "parts", form(*many, ("file_name", b"adapter_config.json"), ("file", CONFIG)))
    assert refused.status_code == 400 and refused.json()["errors"][0]["code"] == 3039, refused.text
    assert f"more than {MAX_FORM_PARTS} parts" in refused.json()["errors"][0]["message"]
    assert uploads_arriving(upload_server) == []


def test_a_form_without_its_closing_boundary_is_incomplete_and_nothing_is_stored(upload_server):
    """Hunt round 15 B-F7. Before: `finalize` does not check that the closing boundary came, so a body cut short was
    taken as a whole form: a valid file cut at a part boundary was stored (200). Now it is a 400 (3039) saying the form
    is incomplete, what arrived is discarded, and the fine-tune still misses that file."""
    assert create(upload_server, "cut").status_code == 200
    parts = (("file_name", b"adapter_config.json"), ("file", CONFIG))
    cut = post_form(upload_server, "cut", form(*parts, closed=False))
    assert cut.status_code == 400 and cut.json()["errors"][0]["code"] == 3039, cut.text
    assert "incomplete" in cut.json()["errors"][0]["message"]
    assert uploads_arriving(upload_server) == []
    using = httpx.post(upload_server.run_url(), json={"prompt": "hi", "lora": "cut", "max_tokens": 2}, timeout=60)
    assert using.status_code == 400 and "adapter_config.json" in using.json()["errors"][0]["message"], using.text
    assert post_form(upload_server, "cut", form(*parts)).status_code == 200  # the same form, whole


def test_an_upload_to_the_trailing_slash_route_has_the_upload_cap(upload_server):
    """Before: `…/finetune-assets/` (as Cloudflare's curl commands write it) had the 10 MB body cap, not the 300 MB
    one, so a real adapter (well over 10 MB) was a 413 there (hunt round 17 A-F3)."""
    assert create(upload_server, "slash-big").status_code == 200
    data = bytes(11 * 2**20)
    stored = httpx.post(api(upload_server, "/finetunes/slash-big/finetune-assets/"), data={"file_name": "adapter_model.safetensors"},
                        files={"file": ("adapter_model.safetensors", data)}, timeout=120)
    assert stored.status_code == 200, stored.text
    kept = upload_server.data_dir / "finetunes" / stored.json()["result"]["id"] / "adapter_model.safetensors"
    assert kept.stat().st_size == len(data)


def answer_before_the_body(server, name: str, file_name: str) -> tuple[int, dict]:
    """An upload declared 50 MB of which 100 kB are sent, the rest never: (status, body) of its answer, which must come
    without the rest of the body."""
    sock = partial_upload(server, 50 * 2**20, name, file_name)
    try:
        received = b""
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < int(
                received.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0] or 1 << 30):
            chunk = sock.recv(65536)  # the socket's 30 s timeout: no answer is a failure
            assert chunk, received
            received += chunk
    finally:
        sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_an_upload_to_no_finetune_or_of_no_asset_is_refused_before_its_body(upload_server):
    """Before: an upload to a fine-tune that does not exist, or with a `file_name` that is no asset, was refused only
    once its whole body had arrived (up to 300 MB), holding one of the 2 upload places all along, so every other upload
    was a 429 meanwhile (hunt round 17 A-F8). Now both are answered without the body, and no place is taken."""
    config = b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}'
    for _ in range(MAX_UPLOADS_IN_FLIGHT + 1):
        status, body = answer_before_the_body(upload_server, "no-such-finetune", "adapter_model.safetensors")
        assert status == 400 and body["errors"][0]["code"] == 5005 and "no-such-finetune" in body["errors"][0]["message"], body
        status, body = answer_before_the_body(upload_server, "small", "weights.bin")
        assert status == 400 and body["errors"][0]["code"] == 3039 and "weights.bin" in body["errors"][0]["message"], body
    assert wait_for(lambda: uploads_arriving(upload_server) == [])
    assert upload(upload_server, "small", "adapter_config.json", config).status_code == 200


def test_a_finetune_description_has_a_documented_limit(upload_server):
    """Before: a description had no limit; 30 of 9 MB made each listing 283 MB, and every list and create read all
    of them again, on the event loop, stalling the server for seconds (hunt round 17 A-F2)."""
    made = httpx.post(api(upload_server, "/finetunes"), json={"model": MODEL, "name": "described",
                                                              "description": "d" * MAX_DESCRIPTION}, timeout=30)
    assert made.status_code == 200 and made.json()["result"]["description"] == "d" * MAX_DESCRIPTION, made.text
    refused = httpx.post(api(upload_server, "/finetunes"), json={"model": MODEL, "name": "verbose",
                                                                 "description": "d" * (MAX_DESCRIPTION + 1)}, timeout=30)
    assert refused.status_code == 400, refused.text
    error = refused.json()["errors"][0]
    assert error["code"] == 5006 and "/description" in error["message"] and str(MAX_DESCRIPTION) in error["message"], error
    assert "verbose" not in [f["name"] for f in httpx.get(api(upload_server, "/finetunes"), timeout=30).json()["result"]]


def test_the_store_reads_its_finetunes_once(tmp_path):
    """Before: every list, get and create parsed every stored meta.json again (on the event loop, in the routes). Now
    they are read once and kept: a meta.json changed on disk afterwards (the server is its only writer) is not read."""
    store = FinetuneStore(tmp_path)
    first = store.create(MODEL, "first", "one")
    again = FinetuneStore(tmp_path)  # as a restarted server: read from disk
    assert [(f.id, f.description) for f in again.list()] == [(first.id, "one")]
    (store.folder(first) / "meta.json").write_text("not json")
    second = again.create(MODEL, "second")
    assert [f.name for f in again.list()] == ["first", "second"] and again.get("first").id == first.id
    assert again.get(first.id.upper()) is again.get("first") and again.get(second.id).name == "second"
    assert again.damaged() == [] and [folder for folder, _ in FinetuneStore(tmp_path).damaged()] == [store.folder(first)]
    with pytest.raises(FinetuneError, match=f"the limit is {MAX_DESCRIPTION}"):
        again.create(MODEL, "third", "d" * (MAX_DESCRIPTION + 1))
