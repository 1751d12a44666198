"""scripts/slim-venv.sh (the Dockerfile's venv stages): what a function never loads goes, what
something still needs stays, and what is left still imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from shared.config import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "slim-venv.sh"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("gcc", "strip", "readelf")), reason="needs gcc and binutils"
)

EXTENSION = r"""
#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "%(name)s", NULL, -1, methods};
PyMODINIT_FUNC PyInit_%(name)s(void) { return PyModule_Create(&module); }
"""


def _extension(folder: Path, name: str, *, debug: bool) -> Path:
    """A real CPython extension module NAME in FOLDER, compiled with or without -g."""
    import sysconfig

    folder.mkdir(parents=True, exist_ok=True)
    source = folder / f"{name}.c"
    source.write_text(EXTENSION % {"name": name})
    target = folder / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    flags = ["-g"] if debug else []
    include = sysconfig.get_paths()["include"]
    subprocess.run(["gcc", "-shared", "-fPIC", *flags, f"-I{include}", str(source), "-o", str(target)], check=True)
    source.unlink()
    return target


def _has_debug_info(path: Path) -> bool:
    sections = subprocess.run(["readelf", "-S", str(path)], capture_output=True, text=True, check=True).stdout
    return ".debug_info" in sections


@pytest.fixture
def runtime_venv(tmp_path: Path) -> Path:
    """A venv with pip, a package with a tests folder, and stand-ins laid out as onnxruntime's wheel."""
    root = tmp_path / "venv"
    venv.create(root, with_pip=True)
    (site,) = (root / "lib").glob("python3*/site-packages")
    (site / "pkg" / "tests").mkdir(parents=True)
    (site / "pkg" / "tests" / "test_pkg.py").write_text("assert True\n")
    (site / "pkg" / "__init__.py").write_text("")
    _extension(site / "pkg", "fast", debug=True)
    _extension(site / "onnxruntime" / "capi", "binding", debug=False)
    (site / "onnxruntime" / "capi" / "libonnxruntime.so.1.31.1").write_bytes(b"\x7fELF C API library")
    return root


def _slim(root: Path) -> str:
    done = subprocess.run(["sh", str(SCRIPT), str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _import(root: Path, module: str) -> int:
    (site,) = (root / "lib").glob("python3*/site-packages")
    code = f"import sys; sys.path.insert(0, {str(site / 'pkg')!r}); import {module}; print({module}.answer())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_pip_tests_unused_library_and_debug_info_go_and_the_module_still_imports(runtime_venv: Path) -> None:
    (site,) = (runtime_venv / "lib").glob("python3*/site-packages")
    (module,) = (site / "pkg").glob("fast*.so")
    assert _has_debug_info(module)
    size = module.stat().st_size

    report = _slim(runtime_venv)

    assert not (runtime_venv / "bin" / "pip").exists() and not list(site.glob("pip"))
    assert not (site / "pkg" / "tests").exists() and (site / "pkg" / "__init__.py").exists()
    assert not (site / "onnxruntime" / "capi" / "libonnxruntime.so.1.31.1").exists()
    assert not _has_debug_info(module) and module.stat().st_size < size
    assert _import(runtime_venv, "fast") == 42
    assert "MB ->" in report


def test_the_c_api_library_stays_when_another_library_names_it(runtime_venv: Path) -> None:
    (site,) = (runtime_venv / "lib").glob("python3*/site-packages")
    user = site / "onnxruntime" / "capi" / "libonnxruntime_providers_x.so"
    user.write_bytes(b"\x7fELF NEEDED libonnxruntime.so.1\x00")

    report = _slim(runtime_venv)

    assert (site / "onnxruntime" / "capi" / "libonnxruntime.so.1.31.1").exists()
    assert "keeping" in report and "libonnxruntime_providers_x.so" in report
