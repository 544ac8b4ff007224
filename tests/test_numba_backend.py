"""The numba backend beyond the shared suite: elements a kernel might forget to write, work
splits and thread counts that must not change a bit, long sequences, selection, and the
on-disk kernel cache of a read-only install."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from gla_testing import Case, check_against_reference, make_inputs, outputs_and_grads
from glakernels import gated_linear_attention
from glakernels._dispatch import ENV_BACKEND, registry, select_backend
from glakernels._problem import ProblemSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKEND = registry.get("numba")
needs_numba = pytest.mark.skipif(not BACKEND.available, reason="; ".join(BACKEND.availability()))


def _launch():
    from glakernels.backends.numba import launch

    return launch


@pytest.fixture
def nan_buffers(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an unwritten element cannot pass by
    holding a previous call's (correct) result."""
    monkeypatch.setattr(_launch(), "_empty", lambda shape, dtype: torch.full(shape, float("nan"), dtype=dtype))


@needs_numba
@pytest.mark.parametrize("threads", [1, 3], ids=lambda n: f"threads{n}")
@pytest.mark.parametrize(
    "case",
    [
        Case(2, 33, 2, 17, 130, torch.float32),  # V = 130: three backward value blocks
        Case(1, 40, 1, 9, 70, torch.float64, bidirectional=False, states=True, gates="extreme"),
        Case(1, 25, 1, 3, 5, torch.float16),
        Case(1, 1, 1, 1, 1, torch.float32, bidirectional=False, states=True),
    ],
    ids=lambda c: c.id(),
)
def test_every_element_is_written(nan_buffers, monkeypatch, threads, case):
    # the thread count decides how the work is cut into items (directions, value blocks)
    monkeypatch.setattr(_launch(), "_threads", lambda: threads)
    check_against_reference("numba", case, "cpu", seed=threads)


def _run_all(case: Case, seed: int):
    x = make_inputs(case, seed=seed)
    kwargs = {"bidirectional": case.bidirectional, "backend": "numba"}
    if case.states:
        kwargs["output_final_state"] = True
    got, _ = outputs_and_grads(gated_linear_attention, x, None, **kwargs)
    return got


@needs_numba
@pytest.mark.parametrize(
    "case",
    [Case(1, 29, 1, 12, 40, torch.float32, bidirectional=False, states=True, gates="strong"),
     Case(1, 29, 1, 12, 40, torch.float32), Case(2, 19, 1, 5, 40, torch.float64),
     Case(1, 23, 1, 6, 67, torch.float32, bidirectional=False, states=True), Case(1, 29, 1, 12, 67, torch.float32)],
    ids=lambda c: c.id(),
)
def test_results_do_not_depend_on_the_work_split(monkeypatch, case):
    """Bitwise: with more threads than sequences the work is cut finer (directions and value
    blocks as separate items, shares added afterwards) than with a sequence per thread (items
    that own whole sequences); no bit of any output or gradient may change."""
    launch = _launch()
    results = {}
    for threads in (1, 2, 5, 64):
        monkeypatch.setattr(launch, "_threads", lambda threads=threads: threads)
        results[threads] = _run_all(case, seed=3)
    assert launch.forward_block_v(1, case.V, 64) < case.V, "the test must exercise a split"
    for threads, got in results.items():
        for name, value in got.items():
            assert torch.equal(value, results[1][name]), f"{name} differs with {threads} threads"


@needs_numba
def test_torch_thread_count_is_left_as_the_caller_set_it():
    """Numba's OpenMP layer, when it starts (on the first parallel call), sets the calling
    thread's OpenMP thread count, which is also PyTorch's: a process that had called
    ``torch.set_num_threads(1)`` ran PyTorch on Numba's count (every core) after its first
    numba call (when PyTorch had run parallel work of its own first). The backend puts
    PyTorch's count back. (A fresh process: the layer starts once per process.)"""
    script = textwrap.dedent(
        """
        import torch
        from glakernels import gated_linear_attention
        torch.set_num_threads(1)
        torch.randn(100_000).exp().sum()  # PyTorch's own parallel work first, as in any program
        gen = torch.Generator().manual_seed(0)
        q, k, g = (torch.randn(2, 9, 2, 4, generator=gen, requires_grad=True) for _ in range(3))
        v = torch.randn(2, 9, 2, 5, generator=gen, requires_grad=True)
        out = gated_linear_attention(q, k, v, -g.detach().abs().requires_grad_(), backend="numba")
        after_forward = torch.get_num_threads()
        out.sum().backward()
        print(after_forward, torch.get_num_threads())
        """
    )
    env = dict(os.environ, NUMBA_NUM_THREADS="2", NUMBA_THREADING_LAYER="omp")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "threading layer" in result.stderr.lower():
        pytest.skip("Numba's OpenMP threading layer is not available here")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "1"], result.stdout


@needs_numba
def test_numba_num_threads_is_respected_and_changes_nothing(tmp_path):
    """A process started with NUMBA_NUM_THREADS=1 runs one thread and gets the same bits."""
    case = Case(1, 37, 2, 16, 24, torch.float32, bidirectional=False, states=True)
    script = textwrap.dedent(
        f"""
        import sys, torch, numba
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_numba_backend import _run_all
        from gla_testing import Case
        assert numba.get_num_threads() == 1, numba.get_num_threads()
        torch.save(_run_all(Case(*{(case.B, case.T, case.H, case.K, case.V)!r}, torch.float32, False, True), seed=7),
                   {str(tmp_path / 'one_thread.pt')!r})
        """
    )
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    single = torch.load(tmp_path / "one_thread.pt")
    here = _run_all(case, seed=7)
    for name, value in here.items():
        assert torch.equal(value, single[name]), name


@needs_numba
def test_concurrent_calls_from_python_threads():
    """Several Python threads calling at once (a threading layer that is not thread-safe
    aborts the process here) get the bits they get one at a time."""
    cases = [Case(2, 31, 2, 8, 24, torch.float32), Case(1, 40, 3, 16, 8, torch.float32, bidirectional=False, states=True)]
    jobs = [(case, seed) for case in cases for seed in range(3)]
    expected = [_run_all(case, seed) for case, seed in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: _run_all(*job), jobs))
    for (case, seed), got, want in zip(jobs, results, expected):
        for name in want:
            assert torch.equal(got[name], want[name]), f"{case.id()} seed {seed}: {name}"


@needs_numba
@pytest.mark.parametrize(
    "case",
    [Case(1, 2000, 1, 8, 8, torch.float32, bidirectional=False, states=True, gates="none"),
     Case(1, 2000, 1, 8, 8, torch.float32, gates="vig"),
     Case(1, 1500, 1, 8, 8, torch.float32, bidirectional=False, states=True, gates="extreme")],
    ids=lambda c: c.id(),
)
def test_long_sequences(case):
    """T·eps rounding: undecayed states grow over thousands of steps, and the gate gradient
    sums over all of them."""
    check_against_reference("numba", case, "cpu", seed=21)


@needs_numba
def test_is_the_automatic_cpu_backend(monkeypatch):
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for bidirectional, states in ((True, False), (False, True)):
            spec = ProblemSpec(2, 10, 3, 8, 8, dtype, "cpu", bidirectional, states, states)
            assert select_backend(spec).name == "numba"


def test_unavailable_without_numba(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # makes "import numba" raise ImportError
    reasons = type(BACKEND)().unavailable_reasons()
    assert len(reasons) == 1 and "numba is not importable" in reasons[0]


_CACHE_SCRIPT = """
import sys, torch
from glakernels import gated_linear_attention
from glakernels.backends.numba import recurrent
assert recurrent.__file__.startswith(sys.argv[1]), recurrent.__file__
x = {n: torch.randn(2, 9, 2, 4, generator=torch.Generator().manual_seed(0)) for n in "qkv"}
expected = gated_linear_attention(**x, g=-x["q"].abs(), backend="torch")
assert torch.allclose(gated_linear_attention(**x, g=-x["q"].abs(), backend="numba"), expected, atol=1e-5)
kernels = (recurrent.exp_rows, recurrent.forward_recurrence)  # the forward pass's; compiles fastest
print("hits", sum(sum(k.stats.cache_hits.values()) for k in kernels))
print("misses", sum(sum(k.stats.cache_misses.values()) for k in kernels))
"""


def _make_read_only(directories: list[pathlib.Path], read_only: bool) -> None:
    """Stop (or allow again) creating files in ``directories``. Root ignores mode bits, so as
    root the directories are made immutable instead (``chattr +i``)."""
    for path in directories:
        if os.getuid() == 0:
            flag = "+i" if read_only else "-i"
            result = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
            if result.returncode != 0 and read_only:
                pytest.skip(f"running as root and cannot make a directory immutable: {result.stderr.strip()}")
        else:
            path.chmod(0o555 if read_only else 0o755)


@needs_numba
@pytest.mark.slow
def test_read_only_install_compiles_once_into_the_user_cache(tmp_path):
    """Installed read-only (as a system-wide package), the kernels still compile, land in the
    user's cache (no NUMBA_CACHE_DIR set), and the next process loads them from there."""
    site, home = tmp_path / "site", tmp_path / "home"
    shutil.copytree(ROOT / "glakernels", site / "glakernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "backends", site / "glakernels" / "backends", ignore=shutil.ignore_patterns("__pycache__"))
    home.mkdir()
    directories = [site, *(p for p in site.rglob("*") if p.is_dir())]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE") and k != "XDG_CACHE_HOME"}
    env.update(HOME=str(home), PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    _make_read_only(directories, True)
    try:
        runs = []
        for _ in range(2):
            result = subprocess.run(
                [sys.executable, "-c", _CACHE_SCRIPT, str(site)], env=env, cwd=tmp_path, capture_output=True,
                text=True, timeout=600,
            )
            assert result.returncode == 0, result.stderr
            runs.append(dict(line.split() for line in result.stdout.splitlines()))
    finally:
        _make_read_only(directories, False)
    assert runs[0]["misses"] != "0" and runs[0]["hits"] == "0", runs[0]
    assert runs[1]["misses"] == "0" and runs[1]["hits"] != "0", runs[1]
    assert list((home / ".cache").rglob("*.nbi")), "no cache index in the user cache"
    assert not list(site.rglob("*.nbi")), "wrote into the read-only install"
