"""The built wheel carries every file the backends need, installs ``backends/`` as
``glakernels.backends`` (no top-level ``backends`` module), and works outside the checkout."""

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(out), "-q"],
        capture_output=True, text=True, timeout=600, cwd=build,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("glakernels-*.whl")
    return path


def _source_files():
    """Every file under backends/ and glakernels/ that a backend may need at run time."""
    for top, prefix in (("glakernels", "glakernels"), ("backends", "glakernels/backends")):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc",):
                yield f"{prefix}/{path.relative_to(ROOT / top).as_posix()}"


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(set(_source_files()) - names)
    assert not missing, f"files missing from the wheel: {missing}"
    assert not any(n.startswith("backends/") for n in names), "a top-level 'backends' package leaked"
    assert not any(n.startswith("tests/") for n in names)


def test_wheel_installs_and_runs(wheel, tmp_path):
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel), "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    code = (
        "import glakernels, torch, sys\n"
        f"assert glakernels.__file__.startswith({str(target)!r}), glakernels.__file__\n"
        "x = torch.randn(1, 5, 1, 3)\n"
        "print(glakernels.gated_linear_attention(x, x, x, -x.abs(), backend='torch').shape)\n"
        "print(sorted(s.name for s in glakernels.available_backends()))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 5, 1, 3])" in result.stdout


def test_xdist_workers_share_the_cpu_threads():
    """tests/conftest.py splits the cores among pytest-xdist workers; oversubscribed, the
    float64 CPU gradchecks stalled a 16-worker run on a 16-core GPU host (session 16)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers or int(workers) < 2:
        pytest.skip("only meaningful under pytest-xdist with several workers")
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert torch.get_num_threads() * int(workers) <= max(cores, int(workers))
