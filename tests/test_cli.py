"""The command line through main(argv) and through the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from distill_detect import cli
from distill_detect.cli import main


@pytest.fixture()
def qfiles(tmp_path):
    m = tmp_path / "members.jsonl"
    n = tmp_path / "non.csv"
    m.write_text(
        "".join(
            json.dumps({"id": f"m{i}", "question": f"Tom has {i} apples and buys {i + 3}. How many now?"}) + "\n"
            for i in range(5)
        )
    )
    n.write_text("id,question\n" + "".join(f"n{i},Sara runs {i} km a day for {i + 2} days. How far?\n" for i in range(5)))
    return m, n


def test_run_then_rescore_with_other_params_without_model(tmp_path, qfiles, tiny_dir, capsys):
    m, n = qfiles
    out = tmp_path / "out"
    rc = main(
        [
            "run",
            "--model",
            str(tiny_dir),
            "--members",
            str(m),
            "--nonmembers",
            str(n),
            "--out",
            str(out),
            "--max-new-tokens",
            "12",
            "--bootstrap",
            "50",
        ]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert "tpd" in table and "TPR@1%FPR" in table
    # The run ends with the HTML report and TPD's ablations, computed from the stored traces.
    assert f"report: {out / 'report.html'}" in table and (out / "report.html").stat().st_size > 10_000
    assert json.loads((out / "ablations.json").read_text())
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {r["label"] for r in rows} == {0, 1}
    assert all(set(r) == {"id", "label", "tpd"} for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    tpd = metrics["methods"]["tpd"]
    assert set(tpd) >= {
        "auc",
        "auc_ci",
        "tpr_at_1pct_fpr",
        "tpr_at_1pct_fpr_strict",
        "tpr_at_5pct_fpr",
        "n_members",
        "n_nonmembers",
    }
    assert tpd["n_members"] == 5 and tpd["n_nonmembers"] == 5 and 0 <= tpd["auc"] <= 1
    assert metrics["config"]["source"]["fingerprint"]["model"]["content_hash"]
    assert metrics["config"]["package_version"]
    # TPD-only: decoding stops at min(max_new_tokens, M); here the cap (12) binds.
    assert metrics["config"]["max_new_tokens"] == 12

    # Rescoring with other hyperparameters reads the store only (no --model: nothing is loaded).
    out2 = tmp_path / "out2"
    assert (
        main(
            [
                "score",
                "--run",
                str(out / "run"),
                "--out",
                str(out2),
                "--tpd-tokens",
                "5",
                "--tpd-alpha",
                "1.0",
                "--bootstrap",
                "50",
                "--no-report",
            ]
        )
        == 0
    )
    from distill_detect.detectors.tpd import tpd_deviation
    from distill_detect.pipeline import read_run

    traces, _, _ = read_run(out / "run")
    rows2 = {json.loads(x)["id"]: json.loads(x)["tpd"] for x in (out2 / "scores.jsonl").read_text().splitlines()}
    for t in traces:
        assert rows2[t.id] == pytest.approx(tpd_deviation(t.output_logprobs, alpha=1.0, max_tokens=5))

    # export -> score --traces gives the same scores as score --run.
    assert main(["export", str(out / "run"), "--out", str(tmp_path / "t.jsonl")]) == 0
    out3 = tmp_path / "out3"
    assert main(["score", "--traces", str(tmp_path / "t.jsonl"), "--out", str(out3), "--bootstrap", "50", "--no-report"]) == 0
    a = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out3 / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in a] == [r["id"] for r in b]
    np.testing.assert_allclose([r["tpd"] for r in a], [r["tpd"] for r in b], rtol=1e-6)


def test_generate_budget_and_label(tmp_path, qfiles, tiny_dir):
    m, _ = qfiles
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_dir),
                "--questions",
                str(m),
                "--out",
                str(tmp_path / "r"),
                "--max-new-tokens",
                "7",
                "--label",
                "1",
            ]
        )
        == 0
    )
    from distill_detect.pipeline import read_run

    traces, _, _ = read_run(tmp_path / "r")
    assert len(traces) == 5 and all(t.num_tokens <= 7 and t.label == 1 for t in traces)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["score", "--run", "nowhere", "--out", "x"], "not a run directory"),
        (["score", "--traces", "t.jsonl", "--out", "x", "--methods", "tdp"], "Did you mean 'tpd'"),
        (["score", "--traces", "t.jsonl", "--out", "x", "--tpd-tau", "1.5"], "tau must be in (0, 1]"),
        (["score", "--traces", "t.jsonl", "--out", "x", "--tpd-alpha", "0"], "alpha must be a positive"),
        (["score", "--traces", "t.jsonl", "--out", "x", "--tpd-tokens", "0"], "M) must be an integer >= 1"),
        (["score", "--traces", "t.jsonl", "--out", "x", "--param", "tpd.beta=1"], "no parameter 'beta'"),
        (["score", "--traces", "bad.jsonl", "--out", "x"], "bad.jsonl:2: field 'output_logprobs'"),
        (["generate", "--questions", "missing.jsonl", "--out", "r"], "missing.jsonl: file not found"),
        (["generate", "--questions", "t.jsonl", "--out", "r", "--backend", "hff"], "Did you mean 'hf'"),
        (["run", "--members", "t.jsonl", "--nonmembers", "t.jsonl", "--out", "r"], "also in the members file"),
        (["generate", "--questions", "t.jsonl", "--out", "r", "--field", "problem"], "missing field 'problem'"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jsonl").write_text('{"id": "a", "question": "q", "output_logprobs": [-1]}\n')
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "output_logprobs": [-1]}\n{"id": "b", "output_logprobs": [NaN]}\n')
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill-detect: error:") and needle in err and "\n" not in err and "Traceback" not in err


def test_one_class_and_empty_traces_warn_but_succeed(tmp_path, capsys):
    p = tmp_path / "t.jsonl"
    p.write_text('{"id": "a", "label": 1, "output_logprobs": []}\n{"id": "b", "label": 1, "output_logprobs": [-0.5]}\n')
    assert main(["score", "--traces", str(p), "--out", str(tmp_path / "o"), "--bootstrap", "20", "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 traces have no generated tokens" in err and "NaN" in err
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())["methods"]["tpd"]
    assert np.isnan(m["auc"]) and m["n_nonmembers"] == 0
    rows = [json.loads(x) for x in (tmp_path / "o" / "scores.jsonl").read_text().splitlines()]
    assert rows[0]["tpd"] == 0.0


def test_every_subcommand_has_help_with_an_example(capsys):
    for cmd in ("generate", "score", "export", "run"):
        with pytest.raises(SystemExit) as ei:
            main([cmd, "--help"])
        assert ei.value.code == 0
        assert "example:" in capsys.readouterr().out


def test_console_script_is_installed_and_fast():
    exe = shutil.which("distill-detect") or str(__import__("pathlib").Path(sys.executable).parent / "distill-detect")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "generate" in r.stdout
    # Heavy libraries are not imported for --help.
    code = "import sys, distill_detect.cli as c; c.build_parser(); print(sorted(m for m in ('torch','transformers','sklearn','matplotlib') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]"


def test_threads_reach_the_cpu_backends_and_zero_is_refused():
    from distill_detect.backends.capabilities import backend_kwargs
    from distill_detect.errors import ConfigError

    base = ["run", "--members", "m", "--nonmembers", "n", "--out", "o"]
    args = cli.build_parser().parse_args(base + ["--threads", "3"])
    assert backend_kwargs("llamacpp", args, {"model": "m"})["n_threads"] == 3
    assert backend_kwargs("hf", args, {"model": "m"})["n_threads"] == 3
    assert "n_threads" not in backend_kwargs("openai", args, {"model": "m"})
    assert "n_threads" not in backend_kwargs("hf", cli.build_parser().parse_args(base), {"model": "m"})
    with pytest.raises(ConfigError, match="--threads 0"):
        backend_kwargs("hf", cli.build_parser().parse_args(base + ["--threads", "0"]), {"model": "m"})
