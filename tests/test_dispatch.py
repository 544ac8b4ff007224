"""Backend selection: argument > use_backend() > GLAKERNELS_BACKEND > automatic; named
backends never fall back; available_backends(); the glakernels command."""

import os
import re
import subprocess
import sys
import threading
import types

import pytest
import torch

import glakernels
from backends_for_tests import RecordingBackend
from gla_testing import temporary_backend
from glakernels import BackendNotSupportedError, available_backends, gated_linear_attention, use_backend
from glakernels._dispatch import ENV_BACKEND, BackendRegistry, registry, select_backend
from glakernels._problem import ProblemSpec
from glakernels.cli import _parser as _cli_parser
from glakernels.cli import main as cli_main


def inputs(K=4):
    torch.manual_seed(0)
    return dict(q=torch.randn(1, 6, 1, K), k=torch.randn(1, 6, 1, K), v=torch.randn(1, 6, 1, 3), g=-torch.rand(1, 6, 1, K))


def cpu_spec(**overrides):
    fields = dict(batch=1, seq_len=6, heads=1, head_dim_k=4, head_dim_v=3, dtype=torch.float32,
                  device_type="cpu", bidirectional=True)
    fields.update(overrides)
    return ProblemSpec(**fields)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    return monkeypatch


def test_automatic_selection_follows_declared_priority(clean_env):
    spec = cpu_spec()
    expected = max(
        (b for b in registry.backends() if b.priority_for("cpu") is not None and not b.not_supported_reasons(spec)),
        key=lambda b: b.priority_for("cpu"),
    )
    assert select_backend(spec) is expected
    with temporary_backend(RecordingBackend("preferred", auto_priority={"cpu": 10_000})) as preferred:
        assert select_backend(spec) is preferred
        gated_linear_attention(**inputs())
        assert [c[0] for c in preferred.calls] == ["forward"]


def test_selection_sees_whether_gradients_will_be_needed(clean_env):
    class Asked(RecordingBackend):
        def priority_for_problem(self, spec):
            self.asked.append(spec.needs_grad)
            return 10_000

    with temporary_backend(Asked("asked", auto_priority={"cpu": 1})) as backend:
        backend.asked = []
        x = inputs()
        gated_linear_attention(**x)
        x["v"].requires_grad_()
        gated_linear_attention(**x).sum().backward()
        with torch.no_grad():
            gated_linear_attention(**x)
    assert set(backend.asked) == {False, True}
    # each call's rank is asked with its own needs_grad: False, True, False in call order
    assert [a for i, a in enumerate(backend.asked) if i == 0 or a != backend.asked[i - 1]] == [False, True, False]


def test_a_backend_may_rank_forward_only_calls_higher(clean_env):
    class InferenceFirst(RecordingBackend):
        def priority_for_problem(self, spec):
            return 10_000 if not spec.needs_grad else None

    with temporary_backend(InferenceFirst("inference-first", auto_priority={"cpu": 1})) as backend:
        x = inputs()
        gated_linear_attention(**x)
        assert len(backend.calls) == 1
        x["q"].requires_grad_()
        gated_linear_attention(**x)
        assert len(backend.calls) == 1  # training call: another backend


def test_automatic_selection_skips_backends_that_cannot_run(clean_env):
    with temporary_backend(RecordingBackend("limited", auto_priority={"cpu": 10_000}, max_head_dim_k=2)) as limited:
        gated_linear_attention(**inputs(K=4))
        assert limited.calls == []  # K=4 is above its limit: the next backend runs
        gated_linear_attention(**inputs(K=2))
        assert len(limited.calls) == 1
    with temporary_backend(RecordingBackend("broken", auto_priority={"cpu": 10_000}, unavailable=["no GPU"])) as broken:
        gated_linear_attention(**inputs())
        assert broken.calls == []


def test_backend_not_chosen_automatically_without_priority(clean_env):
    with temporary_backend(RecordingBackend("by-name-only")) as backend:
        gated_linear_attention(**inputs())
        assert backend.calls == []
        gated_linear_attention(**inputs(), backend="by-name-only")
        assert len(backend.calls) == 1


def test_selection_order(clean_env):
    with temporary_backend(RecordingBackend("env")) as env, temporary_backend(RecordingBackend("ctx")) as ctx, \
            temporary_backend(RecordingBackend("arg")) as arg:
        clean_env.setenv(ENV_BACKEND, "env")
        gated_linear_attention(**inputs())
        assert (len(env.calls), len(ctx.calls), len(arg.calls)) == (1, 0, 0)
        with use_backend("ctx"):
            gated_linear_attention(**inputs())
            assert (len(env.calls), len(ctx.calls), len(arg.calls)) == (1, 1, 0)
            gated_linear_attention(**inputs(), backend="arg")
            assert (len(env.calls), len(ctx.calls), len(arg.calls)) == (1, 1, 1)
        with use_backend("auto"):  # "auto" overrides the environment
            gated_linear_attention(**inputs())
            assert len(env.calls) == 1


def test_use_backend_nests_restores_and_is_thread_local(clean_env):
    with temporary_backend(RecordingBackend("outer")) as outer, temporary_backend(RecordingBackend("inner")) as inner:
        seen_in_thread = []
        with use_backend("outer"):
            with use_backend("inner"):
                gated_linear_attention(**inputs())

                def other_thread():
                    seen_in_thread.append(select_backend(cpu_spec()).name)

                t = threading.Thread(target=other_thread)
                t.start()
                t.join()
            gated_linear_attention(**inputs())
        assert (len(outer.calls), len(inner.calls)) == (1, 1)
        assert seen_in_thread and seen_in_thread[0] not in ("outer", "inner")
    assert select_backend(cpu_spec()).name not in ("outer", "inner")


def test_use_backend_rejects_unknown_names_immediately():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with use_backend("nope"):
            pass
    with pytest.raises(TypeError, match="backend name"):
        with use_backend(None):
            pass


def test_environment_variable_with_unknown_name(clean_env):
    clean_env.setenv(ENV_BACKEND, "nope")
    with pytest.raises(BackendNotSupportedError,
                       match=f"unknown backend 'nope' \\(chosen by the {ENV_BACKEND} environment variable\\)"):
        gated_linear_attention(**inputs())


def test_builtins_load_once_for_threads_that_ask_at_the_same_time(tmp_path, monkeypatch):
    """The first calls may come from several threads at once: none may see the registry
    before the built-in backends have registered (the import takes a while here)."""
    registry_under_test = BackendRegistry("slow_builtins_for_test")
    (tmp_path / "slow_builtins_for_test.py").write_text(
        "import time, slow_builtins_target as t\n"
        "time.sleep(0.3)\n"
        "t.registry.register(t.make('slow-builtin'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "slow_builtins_target",
                        types.SimpleNamespace(registry=registry_under_test, make=RecordingBackend))
    monkeypatch.delitem(sys.modules, "slow_builtins_for_test", raising=False)
    seen, start = [], threading.Barrier(4)

    def ask():
        start.wait()
        seen.append(registry_under_test.names())

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [["slow-builtin"]] * 4


def test_builtins_that_fail_to_import_raise_every_time(tmp_path, monkeypatch):
    registry_under_test = BackendRegistry("broken_builtins_for_test")
    (tmp_path / "broken_builtins_for_test.py").write_text("raise ImportError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for _ in range(2):  # not an empty registry the second time
        with pytest.raises(ImportError, match="broken on purpose"):
            registry_under_test.names()


def test_named_backend_never_falls_back(clean_env):
    with temporary_backend(RecordingBackend("gpu-only", device_types={"cuda"}, unavailable=["triton is not installed"])):
        for how in ("argument", "context", "env"):
            if how == "argument":
                call = lambda: gated_linear_attention(**inputs(), backend="gpu-only")  # noqa: E731
            elif how == "context":
                def call():
                    with use_backend("gpu-only"):
                        gated_linear_attention(**inputs())
            else:
                clean_env.setenv(ENV_BACKEND, "gpu-only")
                call = lambda: gated_linear_attention(**inputs())  # noqa: E731
            with pytest.raises(BackendNotSupportedError) as info:
                call()
            message = str(info.value)
            assert "triton is not installed" in message
            assert "device 'cpu' not supported (runs on cuda)" in message
            assert re.search(r"Backends that can: [\w, -]*\btorch\b", message), message
        assert isinstance(info.value, ValueError)


def test_mode_declarations_are_enforced(clean_env):
    with temporary_backend(RecordingBackend("causal-only", supports_bidirectional=False, supports_states=False)):
        with pytest.raises(BackendNotSupportedError, match="bidirectional mode not supported"):
            gated_linear_attention(**inputs(), backend="causal-only")
        with pytest.raises(BackendNotSupportedError, match="initial_state / output_final_state not supported"):
            gated_linear_attention(**inputs(), bidirectional=False, output_final_state=True, backend="causal-only")
        gated_linear_attention(**inputs(), bidirectional=False, backend="causal-only")
    with temporary_backend(RecordingBackend("f64-only", dtypes=frozenset({torch.float64}))):
        with pytest.raises(BackendNotSupportedError, match=r"dtype float32 not supported \(float64\)"):
            gated_linear_attention(**inputs(), backend="f64-only")


def test_no_backend_can_run_lists_every_reason():
    spec = cpu_spec(device_type="imaginary")
    with temporary_backend(RecordingBackend("picky", device_types={"cuda"}, auto_priority={"cuda": 1})):
        saved = registry.unregister("torch")
        try:
            with pytest.raises(BackendNotSupportedError, match=r"no backend can run this call .*picky: device 'imaginary'"):
                select_backend(spec)
        finally:
            registry.register(saved)


def test_available_backends_reports_reasons():
    with temporary_backend(RecordingBackend("missing", unavailable=["cupy is not installed"])):
        statuses = {s.name: s for s in available_backends()}
    assert statuses["torch"].available and statuses["torch"].reasons == ()
    assert not statuses["missing"].available
    assert statuses["missing"].reasons == ("cupy is not installed",)
    assert "unavailable: cupy is not installed" in str(statuses["missing"])


def test_registry_rejects_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(RecordingBackend("torch"))
    with pytest.raises(ValueError, match="other than 'auto'"):
        registry.register(RecordingBackend("auto"))
    with pytest.raises(TypeError, match="Backend instance"):
        registry.register(object())


def test_failing_availability_check_is_a_reason_not_a_crash():
    class Exploding(RecordingBackend):
        def unavailable_reasons(self):
            raise ImportError("libfoo.so: cannot open shared object file")

    with temporary_backend(Exploding("exploding")):
        status = {s.name: s for s in available_backends()}["exploding"]
    assert not status.available
    assert "ImportError: libfoo.so" in status.reasons[0]


def test_cli_info(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "available" in out


def test_cli_check_passes_on_this_machine(capsys):
    assert cli_main(["check"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "torch" in out


def test_cli_check_fails_when_a_backend_is_wrong(capsys):
    class Wrong(RecordingBackend):
        def forward(self, inputs):
            o, state = super().forward(inputs)
            return o * 1.001, state

    with temporary_backend(Wrong("wrong", auto_priority={})):
        assert cli_main(["check"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--dtype", "float64", "--device", "meta", "bench"],
                                  ["bench", "--dtype", "float64", "--device", "meta"],
                                  ["--dtype", "float64", "bench", "--device", "meta"]])
def test_cli_options_count_before_or_after_the_command(argv):
    args = _cli_parser().parse_args(argv)
    assert (args.command, args.dtype, args.device) == ("bench", "float64", "meta")


def test_cli_defaults_without_options():
    args = _cli_parser().parse_args(["check"])
    assert (args.dtype, args.device, args.repeats, args.shape) == ("float32", "cpu", 5, None)


@pytest.mark.parametrize("argv", [["--device", "no-such-device", "check"], ["check", "--device", "no-such-device"]])
def test_cli_rejects_a_device_it_cannot_use(argv, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "--device 'no-such-device' cannot be used here" in err


def test_python_dash_m_glakernels_info():
    env = {k: v for k, v in os.environ.items() if k != ENV_BACKEND}
    result = subprocess.run([sys.executable, "-m", "glakernels", "info"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout


def test_import_is_cheap():
    """Importing glakernels must not import the backends' heavy packages. (Triton is left out
    of the check: torch.compiler, which the op's registration uses, may import it itself.)"""
    code = "import sys, glakernels; print(sorted(m for m in ('cupy', 'numba') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_version():
    assert isinstance(glakernels.__version__, str)


def test_constant_result_marking_matches_torch_compiler():
    """``_dispatch`` marks backend selection as a compile-time constant the way
    ``torch.compiler.assume_constant_result`` does (without importing Dynamo at import time)."""
    from glakernels import _dispatch

    def ours():
        pass

    def theirs():
        pass

    assert _dispatch._assume_constant_result(ours) is ours
    assert torch.compiler.assume_constant_result(theirs) is theirs
    assert vars(ours) == vars(theirs) and vars(theirs)


def test_import_does_not_load_dynamo():
    import importlib.util
    import subprocess
    import sys

    def loads_dynamo(modules: str) -> bool:
        code = f"import sys, {modules}; print('torch._dynamo' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        return out.strip() == "True"

    assert not loads_dynamo("glakernels")
    # ``import vig`` registers the models with timm when timm is installed, and timm (through
    # torchvision, on the GPU image) loads Dynamo itself: vig must add nothing beyond that
    timm_loads_it = importlib.util.find_spec("timm") is not None and loads_dynamo("timm")
    assert loads_dynamo("glakernels, vig") == timm_loads_it
