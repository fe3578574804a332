"""The package's layout (docs/design.md): every module imports alone, no module imports another's private names,
imports sit at module level (except optional dependencies), and `stg_ext.combine` needs no diffusers."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys

import pytest

import stg_ext
from tests._package import source_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imported inside functions on purpose: extras a user may not have installed (the `cli`, `test`, `triton` extras),
# the Triton kernels (need triton), and the compiled extension (may not have been built).
OPTIONAL = {"triton", "matplotlib", "cv2", "imageio", "imageio_ffmpeg", "PIL", "transformers", "tqdm",
            "huggingface_hub", "kernels", "stg_ext._C"}


def _modules():
    return sorted(name for name, _, _ in source_files())


def _sources():
    for name, relative, path in source_files():
        yield name, relative, ast.parse(path.read_text(), relative)


def _imported_module(node: ast.ImportFrom, module: str, relative: str) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if relative.endswith("__init__.py") else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def test_every_module_imports_alone_in_a_fresh_interpreter():
    # One interpreter per module would take minutes; instead each module is imported first in its own child,
    # several modules per child in turn, with every stg_ext module but the ops (which register torch ops once)
    # dropped from sys.modules between them: an import cycle or an import that relies on another module having
    # been imported first fails there.
    modules = _modules()
    code = (
        "import sys, importlib, traceback\n"
        "import torch, diffusers\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m.startswith('stg_ext') and not m.startswith(('stg_ext.ops', "
        "'stg_ext.kernels', 'stg_ext._C'))]:\n"
        "        del sys.modules[m]\n"
        "    sys.modules.pop('stg_ext', None)\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append((name, traceback.format_exc()))\n"
        "for name, tb in failed:\n"
        "    print('FAILED', name, tb)\n"
        "sys.exit(1 if failed else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(modules) > 40


@pytest.mark.parametrize("name", ["stg_ext.ops", "stg_ext.ops.extension", "stg_ext.ops.reference",
                                  "stg_ext.weak.model", "stg_ext.guidance.restart", "stg_ext.api", "stg_ext.cli.main"])
def test_key_modules_import_first_in_a_new_interpreter(name):
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_no_module_imports_another_modules_private_names():
    bad = []
    for module, path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _imported_module(node, module, path)
                if not target.startswith("stg_ext"):
                    continue
                bad += [f"{path}:{node.lineno} {target}.{a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__" and f"{target}.{a.name}" not in OPTIONAL]
    assert not bad, bad


def test_imports_are_at_module_level_except_optional_dependencies():
    bad = []
    for module, path, tree in _sources():
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                target = _imported_module(node, module, path)
                names = [f"{target}.{a.name}" if target == "stg_ext" else target for a in node.names]
            for name in names:
                root = name.split(".")[0] if not name.startswith("stg_ext") else name
                if root not in OPTIONAL and not any(name.startswith(f"stg_ext.{o}") for o in OPTIONAL):
                    bad.append(f"{path}:{node.lineno} {name}")
    assert not bad, "\n".join(bad)


def test_combine_does_not_import_diffusers():
    code = ("import sys, time\n"
            "t = time.perf_counter(); import stg_ext; import torch; t_import = time.perf_counter() - t\n"
            "stg_ext.combine(torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), cfg_scale=2.0)\n"
            "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
            "t = time.perf_counter(); stg_ext.apply_stg; t_api = time.perf_counter() - t\n"
            "assert 'diffusers' in sys.modules\n"
            "print(f'{t_import:.3f} {t_api:.3f}')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_public_names_resolve():
    for name in stg_ext.__all__:
        assert getattr(stg_ext, name) is not None
    with pytest.raises(AttributeError):
        stg_ext.no_such_name


def _import_kernels_in_checkout(*flags: str) -> subprocess.CompletedProcess:
    code = ("import os\n"
            "try:\n"
            "    import kernels\n"
            "except ModuleNotFoundError as e:\n"
            "    print('absent:', e)\n"
            "else:\n"
            "    print('found:', os.path.realpath(kernels.__file__))\n")
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_checkout_root_on_sys_path_does_not_shadow_other_kernels_packages():
    # kernels/ is stg_ext.kernels, but from the checkout's root a plain `import kernels` finds the folder first;
    # transformers (>= 5.25) imports Hugging Face's `kernels` package when it loads a model, and failed there
    # ('cannot import name ... from kernels') before kernels/__init__.py handed the name on.
    ours = os.path.join(os.path.realpath(ROOT), "kernels", "__init__.py")
    proc = _import_kernels_in_checkout()
    assert proc.returncode == 0, proc.stderr
    try:
        importlib.metadata.distribution("kernels")  # Hugging Face's (transformers >= 5.25 depends on it)
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    if installed:
        assert proc.stdout.startswith("found:"), proc.stdout
        assert proc.stdout.split(":", 1)[1].strip() != ours
    else:
        assert proc.stdout.startswith("absent:") and "stg_ext.kernels" in proc.stdout, proc.stdout
    # Without site-packages (-S) no other `kernels` exists: the import fails as for a missing package (with the
    # folder's message where the tree has it; CI part 2 runs the tests from a copy without the package sources).
    proc = _import_kernels_in_checkout("-S")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("absent:"), proc.stdout
    if os.path.exists(ours):
        assert "stg_ext.kernels" in proc.stdout, proc.stdout
    proc = subprocess.run([sys.executable, "-c", "import stg_ext.kernels; from transformers import T5EncoderModel"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
