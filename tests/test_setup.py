"""setup.py's toolkit discovery: the real nvcc behind a wrapper script, CUDA_HOME, and the
pip headers a minimal toolkit lacks.  The fake toolkits here are folders with a file that
starts like an ELF binary, which is all the discovery looks at."""
import importlib.util
import os
import stat

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("speedrun_setup", os.path.join(ROOT, "setup.py"))
build_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_script)  # defines the helpers; setup() runs only as __main__


def fake_toolkit(root, headers=()):
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "include"))
    with open(os.path.join(root, "bin", "nvcc"), "wb") as f:
        f.write(b"\x7fELF fake nvcc")
    for header in headers:
        open(os.path.join(root, "include", header), "w").close()
    return str(root)


def wrapper_script(path, target):
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec "{target}" "$@"\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return str(path)


def test_wrapper_script_leads_to_the_real_toolkit(tmp_path, monkeypatch):
    real = fake_toolkit(tmp_path / "cuda-13.0")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    wrapper_script(wrappers / "nvcc", os.path.join(real, "bin", "nvcc"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrappers))
    assert build_script.find_cuda_home() == os.path.realpath(real)


def test_symlinked_nvcc_resolves_to_its_toolkit(tmp_path):
    real = fake_toolkit(tmp_path / "cuda")
    link = tmp_path / "nvcc"
    os.symlink(os.path.join(real, "bin", "nvcc"), link)
    assert build_script._root_of_nvcc(str(link)) == os.path.realpath(real)


def test_wrapper_without_a_real_target_gives_none(tmp_path):
    script = wrapper_script(tmp_path / "nvcc", "/nonexistent/bin/nvcc")
    assert build_script._root_of_nvcc(script) is None


def test_cuda_home_wins_when_it_holds_a_real_nvcc(tmp_path, monkeypatch):
    chosen = fake_toolkit(tmp_path / "chosen")
    monkeypatch.setenv("CUDA_HOME", chosen)
    assert build_script.find_cuda_home() == chosen


def test_cuda_home_pointing_at_a_wrapper_folder_is_ignored(tmp_path, monkeypatch):
    real = fake_toolkit(tmp_path / "real")
    wrappers = tmp_path / "wrap"
    (wrappers / "bin").mkdir(parents=True)
    wrapper_script(wrappers / "bin" / "nvcc", os.path.join(real, "bin", "nvcc"))
    monkeypatch.setenv("CUDA_HOME", str(wrappers))
    monkeypatch.setenv("PATH", str(wrappers / "bin"))
    assert build_script.find_cuda_home() == os.path.realpath(real)


def test_missing_library_headers_come_from_the_pip_wheels(tmp_path):
    nvidia = pytest.importorskip("nvidia")
    toolkit = fake_toolkit(tmp_path / "bare")
    dirs = build_script.pip_cuda_include_dirs(toolkit)
    assert dirs, f"no include folder with cusparse.h etc. under {list(nvidia.__path__)}"
    assert any(os.path.exists(os.path.join(d, "cusparse.h")) for d in dirs)
    complete = fake_toolkit(tmp_path / "complete", headers=build_script.LIBRARY_HEADERS)
    assert build_script.pip_cuda_include_dirs(complete) == []


def test_skip_switch_installs_without_the_extension(monkeypatch, capsys):
    monkeypatch.setenv(build_script.SKIP_ENV, "1")
    assert build_script.extension_modules() == ([], {})
    assert "without the CUDA extension" in capsys.readouterr().err


@pytest.mark.parametrize("versions,bad", [
    ({"torch": "2.11.0+cu130", "triton": "3.6.0", "python": "3.12"}, []),      # the GPU machines' stack
    ({"torch": "2.15.0a0+git", "triton": "3.8.0", "python": "3.11"}, []),      # the newest end
    ({"torch": "2.10.1", "triton": "3.5.1", "python": "3.12"}, ["torch", "triton"]),
    ({"torch": "2.16.0", "triton": "3.9.0", "python": "3.13"}, ["torch", "triton", "python"]),
])
def test_supported_range_both_ends_included(versions, bad):
    problems = build_script.unsupported(versions)
    assert [p.split()[0] for p in problems] == bad
    assert all("outside the supported range" in p for p in problems)


def test_requirements_are_the_supported_range():
    assert build_script.requirement("torch") == "torch>=2.11,<2.16"
    assert build_script.requirement("triton") == "triton>=3.6,<3.9"


def test_install_warns_outside_the_range(monkeypatch, capsys):
    monkeypatch.setattr(build_script, "installed_versions", lambda: {"torch": "2.10.0", "python": "3.11"})
    build_script.warn_if_unsupported()
    assert "warning: torch 2.10.0 is outside the supported range 2.11-2.15" in capsys.readouterr().err
