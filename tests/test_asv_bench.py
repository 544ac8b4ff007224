"""The asv suites import, pass `asv check`, and run once each on this machine without errors
(`asv run --quick`); committed results publish to HTML. Backends or combinations that cannot
run here are skipped by asv (NotImplementedError in setup), not failed. asv writes only under
the test's temporary directory (results, HTML and its machine file in $HOME)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ASV_DIR = pathlib.Path(__file__).resolve().parents[1] / "asv_bench"
RESULTS = ASV_DIR / "results"
QUICK_SHAPE = "vigT_224"

pytest.importorskip("asv", reason="asv is part of the test extra")


def _config(tmp_path, results_dir) -> pathlib.Path:
    """asv.conf.json with every output directory moved under ``tmp_path``."""
    text = "\n".join(line for line in (ASV_DIR / "asv.conf.json").read_text().splitlines()
                     if not line.strip().startswith("//"))
    config = json.loads(text)
    config.update(repo=str(ASV_DIR.parent), benchmark_dir=str(ASV_DIR / "benchmarks"),
                  results_dir=str(results_dir), html_dir=str(tmp_path / "html"), env_dir=str(tmp_path / "env"))
    path = tmp_path / "asv.conf.json"
    path.write_text(json.dumps(config))
    return path


def _env(tmp_path) -> dict:
    env = dict(os.environ, HOME=str(tmp_path))  # asv keeps its machine file in $HOME
    # benchmark the real backends: the test session may have turned Triton's CPU interpreter on
    env.pop("TRITON_INTERPRET", None)
    # every suite and method still runs, for every backend, dtype and direction, but on one
    # DESIGN shape of the five: the whole grid took ~10 minutes of CI on 2 cores (each
    # combination is a process of its own), and the shapes differ only in size here
    env.setdefault("GLAKERNELS_ASV_SHAPES", QUICK_SHAPE)
    return env


def _asv(args, tmp_path, config, timeout=1500):
    env = _env(tmp_path)
    return subprocess.run([sys.executable, "-m", "asv", *args, "--config", str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_asv_check_and_quick_run(tmp_path):
    machine = subprocess.run([sys.executable, str(ASV_DIR / "machine.py")], cwd=tmp_path, env=_env(tmp_path),
                             capture_output=True, text=True, timeout=120)
    assert machine.returncode == 0, machine.stderr
    name = machine.stdout.strip().splitlines()[-1]
    config = _config(tmp_path, tmp_path / "results")
    check = _asv(["check", "--python=same"], tmp_path, config)
    assert check.returncode == 0, check.stdout + check.stderr
    run = _asv(["run", "--python=same", "--quick", "--show-stderr", "--machine", name], tmp_path, config)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "failed" not in run.stdout, run.stdout[-6000:]


def test_committed_results_publish(tmp_path):
    result_files = [p for p in RESULTS.glob("*/*.json") if p.name != "machine.json"]
    if not result_files:
        pytest.skip("no benchmark results committed under asv_bench/results yet")
    publish = _asv(["publish"], tmp_path, _config(tmp_path, RESULTS))
    assert publish.returncode == 0, publish.stdout + publish.stderr
    assert (tmp_path / "html" / "index.html").exists()
    # every committed machine and every benchmark with a recorded value reaches the report
    index = json.loads((tmp_path / "html" / "index.json").read_text())
    machines = {p.parent.name for p in result_files}
    assert machines <= set(index["params"]["machine"]), (machines, index["params"]["machine"])
    recorded = set()
    for path in result_files:
        results = json.loads(path.read_text())["results"]
        recorded |= {name for name, entry in results.items() if any(v is not None for v in _flat(entry[0]))}
    graphs = {p.stem for p in (tmp_path / "html" / "graphs" / "summary").glob("*.json")}
    assert recorded and recorded <= graphs, sorted(recorded - graphs)


def _flat(values):
    if isinstance(values, list):
        for v in values:
            yield from _flat(v)
    else:
        yield values
