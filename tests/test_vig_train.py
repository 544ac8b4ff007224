"""The training CLI: a few steps on the digits, checkpoints and resume (bitwise continuation),
and DistributedDataParallel under torchrun with 2 CPU processes (gloo): replicas identical,
resumable on another process count."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn")

# a very small ViG on 16-px digits: the CLI's logic is under test here, not the accuracy
SMALL = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "4", "--img-size", "16",
         "--batch-size", "16", "--warmup-steps", "2", "--no-progress", "--print-param-hash", "--epochs", "1"]


def _run(args, tmp_path, launcher=(sys.executable, "-m", "vig.train"), timeout=180, attempts=1):
    """Run the CLI; on a timeout kill the whole process tree (torchrun's workers too)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for attempt in range(attempts):
        process = subprocess.Popen([*launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=tmp_path, env=env, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            if attempt + 1 == attempts:
                raise AssertionError(f"timed out after {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout + stderr


def _hashes(output):
    # exactly the 16 hex digits train.py prints: two ranks share one stdout pipe, and another
    # rank's text can land right after a hash (seen once in CI: an "e" glued on, read as a digit)
    return dict(re.findall(r"param-hash rank=(\d+) world=\d+ sha256=([0-9a-f]{16})", output))


def test_resume_continues_bitwise(tmp_path):
    straight = _run([*SMALL, "--steps", "4", "--threads", "1"], tmp_path)
    assert "test accuracy:" in straight
    first = _run([*SMALL, "--steps", "2", "--threads", "1", "--output-dir", "run"], tmp_path)
    assert (tmp_path / "run" / "last.pt").exists()
    resumed = _run([*SMALL, "--steps", "4", "--threads", "1", "--output-dir", "run", "--resume", "auto"], tmp_path)
    assert "resumed from" in resumed and "epoch 0, step 2" in resumed
    assert "after 4 steps" in resumed
    assert _hashes(first)["0"] != _hashes(straight)["0"]
    assert _hashes(resumed)["0"] == _hashes(straight)["0"], "2 + 2 steps must equal 4 steps exactly"


def test_torchrun_two_processes_replicas_identical_and_resume_on_one(tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vig.train")
    # a second attempt only after a timeout: under heavy load we have seen torchrun's gloo
    # teardown stall after the workers finished (rare; the replicas are checked either way)
    out = _run([*SMALL, "--steps", "3", "--output-dir", "ddp"], tmp_path, launcher=torchrun, timeout=120, attempts=2)
    hashes = _hashes(out)
    assert set(hashes) == {"0", "1"}, out[-2000:]
    assert hashes["0"] == hashes["1"], "DDP replicas diverged"
    assert "on 2 x cpu" in out and "after 3 steps" in out
    assert (tmp_path / "ddp" / "last.pt").exists()
    # the same global batches on one process: the same model up to summation order
    single = _run([*SMALL, "--steps", "3", "--threads", "1", "--output-dir", "single"], tmp_path)
    assert "after 3 steps" in single
    ddp_state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)["model"]
    single_state = torch.load(tmp_path / "single" / "last.pt", weights_only=False)["model"]
    for name, value in single_state.items():
        assert torch.allclose(ddp_state[name], value, rtol=1e-4, atol=1e-6), name
    # the same checkpoint continues on a single process
    resumed = _run([*SMALL, "--steps", "5", "--threads", "1", "--output-dir", "ddp", "--resume", "auto"], tmp_path)
    assert "step 3" in resumed and "after 5 steps" in resumed
    assert _hashes(resumed)["0"] != hashes["0"]  # it trained further


def test_eval_only_reports_accuracy_of_checkpoint(tmp_path):
    _run([*SMALL, "--steps", "1", "--threads", "1", "--output-dir", "run"], tmp_path)
    out = _run([*SMALL, "--threads", "1", "--resume", "run/last.pt", "--eval-only"], tmp_path)
    match = re.search(r"test accuracy: ([\d.]+)% \((\d+)/(\d+)\)", out)
    assert match and int(match.group(3)) == 360


def _main(args, tmp_path, monkeypatch):
    """The CLI in this process (its errors as exceptions), in ``tmp_path``."""
    from vig.train import main

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads(), _numba_threads()
    try:
        return main(args)
    finally:
        _restore_threads(threads)  # main sets --threads for the process


def _numba_threads():
    try:
        import numba
    except ImportError:
        return None
    return numba.get_num_threads()


def _restore_threads(threads):
    torch.set_num_threads(threads[0])
    if threads[1] is not None:
        import numba

        numba.set_num_threads(threads[1])


def test_threads_flag_sets_torch_and_the_gla_backend():
    """``--threads 1`` holds for PyTorch's ops and for the GLA op's Numba kernels, also after
    the op has run (Numba's OpenMP layer must not hand PyTorch its count)."""
    from glakernels import gated_linear_attention
    from vig.train import use_cpu_threads

    numba = pytest.importorskip("numba")
    saved = torch.get_num_threads(), _numba_threads()
    try:
        use_cpu_threads(1)
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 9, 2, 4, generator=gen) for _ in range(3))
        gated_linear_attention(q, k, v, -torch.rand(2, 9, 2, 4, generator=gen), backend="numba")
        assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)
    finally:
        _restore_threads(saved)


def test_resume_builds_the_checkpoints_model_and_refuses_another(tmp_path, monkeypatch, capsys):
    """Evaluating or resuming a checkpoint builds the model it records; model flags that describe
    another model are an error (vig_tiny and vig_small share every parameter name and shape, so
    loading one into the other would succeed and silently be a different network)."""
    _main([*SMALL, "--steps", "2", "--output-dir", "run"], tmp_path, monkeypatch)
    trained = re.findall(r"test accuracy: [\d.]+% \((\d+/\d+)\)", capsys.readouterr().out)[-1]
    _main(["--resume", "run/last.pt", "--eval-only", "--no-progress"], tmp_path, monkeypatch)
    assert re.search(r"test accuracy: [\d.]+% \((\d+/\d+)\)", capsys.readouterr().out).group(1) == trained
    with pytest.raises(ValueError, match="holds vig_tiny .* ask for vig_small"):
        _main([*SMALL, "--model", "vig_small", "--resume", "run/last.pt", "--eval-only"], tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="leave the model flags out"):
        _main(["--img-size", "20", "--resume", "run/last.pt", "--eval-only"], tmp_path, monkeypatch)


def test_eval_only_never_scores_an_untrained_model(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        _main([*SMALL, "--eval-only", "--resume", "auto", "--output-dir", "empty"], tmp_path, monkeypatch)


def test_batch_larger_than_the_training_set_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="larger than the 1437 training images"):
        _main([*SMALL, "--batch-size", "5000"], tmp_path, monkeypatch)


@pytest.mark.parametrize("flags", [["--img-size", "0"], ["--threads", "0"], ["--depth", "-1"],
                                   ["--model", "vig_h_tiny", "--depth", "1"], ["--resume", "no_such.pt"]])
def test_bad_flags_are_usage_errors(flags, capsys):
    from vig.train import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_weight_decay_spares_norms_biases_and_the_position_embedding():
    """AdamW's groups: decay on the weight matrices and kernels, none on one-dimensional
    parameters (a norm's scale decayed would shrink towards 0, not 1) nor on ``pos_embed``;
    every trainable parameter in exactly one group."""
    import vig
    from vig.train import parameter_groups

    model = vig.create_model("vig_tiny", num_classes=10, img_size=32)
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decayed | spared == set(names.values()) and not decayed & spared
    assert "pos_embed" in spared and "norm.weight" in spared and "head.bias" in spared
    assert "head.weight" in decayed and "patch_embed.proj.0.weight" in decayed
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_a_checkpoint_from_before_the_groups_resumes(tmp_path):
    """A checkpoint whose optimizer has one group (weight decay on every parameter, before
    ``parameter_groups``) resumes with that optimizer instead of failing to load its state."""
    import vig

    _run([*SMALL, "--steps", "2", "--threads", "1", "--output-dir", "run"], tmp_path)
    path = tmp_path / "run" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert len(ckpt["optimizer"]["param_groups"]) == 2
    model = vig.create_model(ckpt["model_name"], **ckpt["model_kwargs"])
    ckpt["optimizer"] = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05).state_dict()
    torch.save(ckpt, path)
    resumed = _run([*SMALL, "--steps", "3", "--threads", "1", "--output-dir", "run", "--resume", "auto"], tmp_path)
    assert "resumed from" in resumed and "after 3 steps" in resumed
