"""The model cache shared by several processes (two `ossrun serve` started together, replicas on one volume):
the first write of a checkpoint wins, the others use it, nobody fails and no half checkpoint is left."""

from __future__ import annotations

import multiprocessing

from ossrun.model.checkpoint import load_checkpoint, write_once, write_random_checkpoint
from ossrun.model.config import PRESETS


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
