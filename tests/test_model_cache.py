"""The model cache shared by several processes (two `ossrun serve` started together, replicas on one volume):
the first write of a checkpoint wins, the others use it, nobody fails and no half checkpoint is left."""

from __future__ import annotations

import multiprocessing
import shutil

import pytest

from ossrun.model.checkpoint import load_checkpoint, write_once, write_random_checkpoint
from ossrun.model.config import PRESETS
from ossrun.model.resolve import CacheUnwritable, check_room


def _resolve_tiny(cache: str, start, results) -> None:
    import os

    os.environ["OSSRUN_CACHE_DIR"] = cache
    from ossrun.model.resolve import resolve_model

    start.wait()
    try:
        results.put(str(resolve_model("tiny")))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"failed: {type(exc).__name__}: {exc}")


def test_two_processes_writing_one_preset_both_get_it(tmp_path):
    context = multiprocessing.get_context("spawn")  # not fork: earlier tests leave threads (engines) behind
    start, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_resolve_tiny, args=(str(tmp_path), start, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    answers = [results.get(timeout=5) for _ in workers]
    path = tmp_path / "models" / "tiny-original-seed0"
    assert answers == [str(path)] * 2
    assert [p.name for p in (tmp_path / "models").iterdir()] == [path.name]  # no partial left behind
    assert load_checkpoint(path).config.num_hidden_layers == PRESETS["tiny"].num_hidden_layers


def test_a_writer_that_loses_the_race_uses_the_winners_checkpoint(tmp_path):
    path = tmp_path / "models" / "x"

    def write(out):
        write_once(path, lambda other: write_random_checkpoint(PRESETS["tiny"], other, "original", 1))  # another process wins
        write_random_checkpoint(PRESETS["tiny"], out, "original", 1)

    assert write_once(path, write) == path
    assert [p.name for p in path.parent.iterdir()] == ["x"] and load_checkpoint(path).config == PRESETS["tiny"]


def _write_then_hang(path: str, started) -> None:
    import time
    from pathlib import Path

    def write(out):
        (out / "model.safetensors").write_bytes(b"\0" * 4096)  # a first file, then the process is killed
        started.set()
        time.sleep(600)

    write_once(Path(path), write)


def test_a_killed_writers_partial_is_removed_by_the_next_writer_and_a_live_ones_kept(tmp_path):
    """Before: a process killed mid-write left its `NAME.partial-XXXX` folder (13 GB for the 20b preset) for ever."""
    import signal

    context = multiprocessing.get_context("spawn")
    path = tmp_path / "models" / "x"
    started = context.Event()
    killed = context.Process(target=_write_then_hang, args=(str(path), started))
    killed.start()
    assert started.wait(60)
    killed.kill()
    killed.join()
    assert killed.exitcode == -signal.SIGKILL
    assert len(list(path.parent.glob("x.partial-*"))) == 1
    live = context.Process(target=_write_then_hang, args=(str(path), started := context.Event()))
    live.start()
    try:
        assert started.wait(60)
        partials = [p.name for p in path.parent.glob("x.partial-*")]  # the next writer removed the killed one's
        assert len(partials) == 1 and f"-{live.pid}-" in partials[0]
        write_once(path, lambda out: write_random_checkpoint(PRESETS["tiny"], out, "original", 1))
        left = sorted(p.name for p in path.parent.iterdir())
        assert left[0] == "x" and len(left) == 2 and f"-{live.pid}-" in left[1]  # the live writer's stays
    finally:
        live.kill()
        live.join()


def test_a_preset_the_disk_has_no_room_for_is_refused_before_a_byte_is_written(tmp_path):
    """Hunt round 18 A-F2: the 120b preset (65 GB) was written until the disk was full. A checkpoint larger than the
    free space of the disk it goes to (the nearest folder that exists) is refused first, in words."""
    path = tmp_path / "cache" / "models" / "120b-original-seed0"
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CacheUnwritable, match=r"the 120b preset is [\d.,]+ GB of random weights and .* GB free; free "
                                              "space or set OSSRUN_CACHE_DIR to a disk with room"):
        check_room(path, free + 2**40, "the 120b preset")
    check_room(path, 1, "the tiny preset")
    assert list(tmp_path.iterdir()) == []
