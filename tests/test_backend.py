"""Backend selection: set_backend / use_backend / KERNELS_BACKEND, and the backends() report."""
import json
import os
import subprocess
import sys

import pytest

import kernels

PUBLIC_OPS = ["softcap_cross_entropy", "fp8_linear", "linear_softcap_cross_entropy", "newton_schulz",
              "relu2_mlp", "linear_relu2", "sliding_window_attention"]


def test_every_public_op_is_exported_with_a_contract_docstring():
    for name in PUBLIC_OPS + ["set_backend", "backends", "use_backend", "get_backend"]:
        fn = getattr(kernels, name)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"{name} needs a docstring stating its contract"


def test_set_backend_validates_and_use_backend_restores():
    assert kernels.get_backend() == "auto"
    with kernels.use_backend("reference"):
        assert kernels.get_backend() == "reference"
        with kernels.use_backend("TRITON"):
            assert kernels.get_backend() == "triton"
        assert kernels.get_backend() == "reference"
    assert kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="name must be one of"):
        kernels.set_backend("cudnn")
    with pytest.raises(TypeError, match="name"):
        kernels.set_backend(None)
    assert kernels.get_backend() == "auto"


def test_backends_report_covers_every_op():
    report = kernels.backends()
    assert set(report) == {"selected", "cuda_extension", "triton", "gpu", "ops"}
    for op in PUBLIC_OPS:
        entry = report["ops"][op]
        assert entry["on_cpu_tensors"] == "reference"
        assert set(entry["kernels"]) <= {"cuda", "triton"}
    assert report["ops"]["softcap_cross_entropy"]["kernels"] == ["cuda", "triton"]


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_environment_variable_selects_the_backend():
    done = _python("import kernels; print(kernels.get_backend())", KERNELS_BACKEND="reference")
    assert done.returncode == 0 and done.stdout.strip() == "reference"


def test_bad_environment_variable_fails_at_import_naming_it():
    done = _python("import kernels", KERNELS_BACKEND="fastest")
    assert done.returncode != 0
    assert "KERNELS_BACKEND" in done.stderr and "fastest" in done.stderr


def test_python_m_kernels_summarizes_every_op():
    done = _python("import runpy; runpy.run_module('kernels', run_name='__main__')")
    assert done.returncode == 0, done.stderr
    assert "CUDA extension" in done.stdout
    for op in PUBLIC_OPS:
        assert op in done.stdout


def test_python_m_kernels_names_the_mlp_path_this_triton_gives(monkeypatch, capsys):
    from kernels import __main__ as cli
    assert cli.main([]) == 0
    assert "relu2_mlp, linear_relu2: TMA tensor descriptors" in capsys.readouterr().out
    monkeypatch.setattr(cli.relu2_mlp, "TensorDescriptor", None)  # as with a triton that lacks them
    assert cli.main(["--json"]) == 0
    paths = json.loads(capsys.readouterr().out)["triton_paths"]
    assert paths["relu2_mlp, linear_relu2"] == ("pointer variant only (this triton has no "
                                                "triton.tools.tensor_descriptor)")
