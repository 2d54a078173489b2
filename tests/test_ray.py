"""Data-parallel generation on a local Ray cluster (2 CPU workers, the tiny model).

One Ray session per module (starting Ray costs ~10 s). Checks: the Ray run equals the
single-process run exactly (same traces, one writer); a worker killed mid-run has its
batch redone elsewhere, and nothing is lost or duplicated.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray path needs ray: pip install 'distill-detect[ray]'")

from distill_detect.distributed import generate_run_ray  # noqa: E402
from distill_detect.pipeline import generate_run  # noqa: E402
from distill_detect.store import TraceStore  # noqa: E402
from distill_detect.types import Question  # noqa: E402

QS = [Question(id=f"r{i}", text=f"Compute {i} * {i + 3} and explain.", label=i % 2) for i in range(10)]
MAX_NEW = 6


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def factory(tiny_dir):
    from distill_detect.backends.hf import HFBackend

    return functools.partial(HFBackend, str(tiny_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    generate_run(QS, run, factory, max_new_tokens=MAX_NEW, batch_size=2)
    with TraceStore(run) as st:
        return {t.id: t for t in st.traces()}


def _check_same(run, reference):
    with TraceStore(run) as st:
        traces = list(st.traces())
        assert st.integrity_check() == []
        fp = st.get_meta("fingerprint")
    assert sorted(t.id for t in traces) == sorted(q.id for q in QS)  # every question exactly once
    for t in traces:
        r = reference[t.id]
        np.testing.assert_array_equal(t.output_ids, r.output_ids)
        np.testing.assert_allclose(t.output_logprobs, r.output_logprobs, atol=1e-4)  # the stated batch tolerance
    return fp


def test_ray_run_equals_single_process(cluster, factory, reference, tmp_path):
    s = generate_run_ray(QS, tmp_path / "run", factory, max_new_tokens=MAX_NEW, batch_size=2, workers=2)
    assert s["generated"] == len(QS) and s["retried"] == 0
    fp = _check_same(tmp_path / "run", reference)
    assert fp["backend"] == "hf"
    # Resuming a finished run starts no actor.
    s2 = generate_run_ray(QS, tmp_path / "run", factory, max_new_tokens=MAX_NEW, batch_size=2, workers=2)
    assert s2["generated"] == 0 and s2["already_done"] == len(QS)


def test_killed_worker_batch_is_redone_elsewhere(cluster, factory, reference, tmp_path):
    killed = []

    def kill_one(summary, actors):
        # After the first stored batch, kill a worker (possibly mid-batch): its work must move.
        if not killed:
            ray.kill(actors[0])
            killed.append(summary["generated"])

    s = generate_run_ray(QS, tmp_path / "run", factory, max_new_tokens=MAX_NEW, batch_size=1, workers=2, on_commit=kill_one)
    assert killed == [1]
    assert s["generated"] == len(QS) and s["workers_lost"] == 1 and s["retried"] == 1
    _check_same(tmp_path / "run", reference)


def test_all_workers_failing_to_start_is_a_clear_error(cluster, tmp_path):
    from distill_detect.errors import DistillDetectError

    def broken():
        raise RuntimeError("no such model here")

    with pytest.raises(DistillDetectError, match="no Ray worker could start"):
        generate_run_ray(QS[:2], tmp_path / "run", broken, max_new_tokens=MAX_NEW, workers=1)


def test_cli_workers(cluster, tiny_dir, reference, tmp_path):
    """--workers through the CLI: the backend factory (a closure over the parsed arguments) ships to the actors."""
    import json

    from distill_detect import cli

    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": q.id, "question": q.text, "label": q.label}) + "\n" for q in QS))
    args = ["generate", "--questions", str(qfile), "--out", str(tmp_path / "run"), "--model", str(tiny_dir)]
    args += ["--dtype", "float32", "--device", "cpu", "--max-new-tokens", str(MAX_NEW), "--batch-size", "3", "--workers", "2"]
    assert cli.main(args) == 0
    _check_same(tmp_path / "run", reference)
