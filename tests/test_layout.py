"""The package's shape: no import cycle, the Editor API without training or evaluation
code, one registry of editing methods that every entry point uses."""

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from chatedit.methods import METHODS, get_method, help_lines, register_method

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("chatedit", "hypernet")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_only: bool = False) -> set[str]:
    """The modules `path` imports, anywhere in it (deferred imports included) or, with
    `top_only`, at module level."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found = set()
    for node in (tree.body if top_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    # a module's own ancestor packages are initialised before it whatever it imports
    return {m: {i for i in imports(p) if i in modules and not (m + ".").startswith(i + ".")}
            for m, p in modules.items()}


def test_no_import_cycle_anywhere():
    edges, state, cycles = graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_layers():
    """hypernet is pure tensor math; the core never imports the roles built on it at module
    level (the safe model and Editor.quick name theirs lazily); evaluation never imports
    training; training and evaluation never import the safety test bed."""
    edges = graph()
    roles = ("chatedit.training", "chatedit.evaluation", "chatedit.safety")
    for m, deps in edges.items():
        if m.startswith("hypernet"):
            assert not any(d.startswith("chatedit") for d in deps), (m, deps)
    for path in (ROOT / "chatedit").glob("*.py"):
        wrong = [i for i in imports(path, top_only=True) if i.startswith(roles)]
        assert not wrong, f"{path.name} imports {wrong}"
    for m, deps in edges.items():
        if m.startswith("chatedit.evaluation"):
            assert not any(d.startswith("chatedit.training") for d in deps), (m, deps)
        if m.startswith(("chatedit.training", "chatedit.evaluation")):
            assert not any(d.startswith("chatedit.safety") for d in deps), (m, deps)


def test_editor_api_imports_no_training_or_evaluation_code():
    code = ("import sys; from chatedit import Editor; "
            "print(sorted(m for m in sys.modules if m.startswith('chatedit')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    loaded = ast.literal_eval(out.strip())
    assert "chatedit.api" in loaded
    assert not [m for m in loaded if m.startswith(("chatedit.training", "chatedit.evaluation",
                                                   "chatedit.safety"))], loaded


def test_the_demo_path_needs_no_optional_extra():
    """`make demo` installs the core and `plot` only: the edit script, the quick editor's
    meta-training and its validation import without lm-eval, wandb or peft."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('lm_eval', 'wandb', 'peft'):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import chatedit.training.quick, chatedit.training.run, chatedit.evaluation.metrics\n"
            "import runpy; runpy.run_path('scripts/edit.py', run_name='not_main')\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_missing_extra_is_named(monkeypatch):
    from chatedit import extras

    monkeypatch.setitem(extras.EXTRAS, "no_such_package_xyz", "eval")
    with pytest.raises(ImportError, match=r"IFEval scoring needs the no_such_package_xyz "
                                          r"package: pip install 'chatedit\[eval\]'"):
        extras.require("no_such_package_xyz", "IFEval scoring")
    extras.require("torch", "anything")  # present: nothing happens


def test_scripts_are_thin_and_dispatch_through_the_registry():
    entry_points = [*(ROOT / "scripts").glob("*.py"), *(ROOT / "chatedit" / "cli").glob("*.py")]
    for path in sorted(entry_points):
        lines = path.read_text().splitlines()
        assert len(lines) <= 110, f"{path.name}: {len(lines)} lines"
    dispatch = re.compile(r"""rule\s*(==|!=|in)\s*[("']|\.rule\s*==""")
    for path in [*(ROOT / "scripts").glob("*.py"), *(ROOT / "chatedit").rglob("*.py")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not dispatch.search(line), f"{path.relative_to(ROOT)}:{i}: {line.strip()}"


def test_registry_lists_builtin_methods_with_help_and_rejects_unknown_options():
    assert {"none", "ft", "malmen", "mend", "memit", "alphaedit"} <= set(METHODS)
    assert all(help_lines(get_method(m).config).values() for m in ("memit", "alphaedit"))
    assert get_method("memit").own_layers and not get_method("ft").own_layers
    malmen = get_method("malmen")
    assert malmen.meta_trained and not get_method("ft").meta_trained
    assert all(help_lines(malmen.config).values()), "every option has a help line"
    assert {"step_scale", "joint", "hyper_chunk", "solve_memory_gb", "out_mu", "out_bins"} == \
        malmen.test_time
    assert malmen.config_from({"rank": 8}).rank == 8
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rnak'\]"):
        malmen.config_from(rnak=8)
    with pytest.raises(ValueError, match="unknown editing method 'rome'"):
        get_method("rome")


def test_a_registered_method_is_usable_from_the_api(tiny_llama):
    """A new method is one class plus one registration: here, FT with its own defaults
    (options its config does not name, like chunk_size, take FT's defaults)."""
    from chatedit import Editor
    from chatedit.editors import FTConfig, FineTune

    @dataclass
    class HalfStepConfig:
        name: str = "half"
        rule: str = "half-ft"
        steps: int = 1
        lr: float = 5e-5

    register_method("half-ft", HalfStepConfig, FineTune)
    try:
        model, tok = tiny_llama
        ed = Editor.from_pretrained(model, tokenizer=tok, method="half-ft", steps=2)
        assert isinstance(ed.method, FineTune) and ed.method.steps == 2
        assert ed.method.lr == 5e-5 and ed.method.chunk_size == FTConfig.chunk_size
        with pytest.raises(ValueError, match="already registered"):
            register_method("half-ft", HalfStepConfig, FineTune)
        with pytest.raises(ValueError, match="is meta-trained"):
            Editor.from_pretrained(model, tokenizer=tok, method="malmen")
    finally:
        del METHODS["half-ft"]
