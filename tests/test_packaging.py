"""A wheel installed into a fresh virtual environment, used from outside the checkout: the
configs ship inside the package, so `Editor.quick` and the console scripts work there."""
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["locality=nq", "train.steps=2", "train.n_edits=4", "train.train_facts=12",
         "data.val_size=4", "train.test_facts=0", "editor.rank=8", "train.val_every=2",
         "train.ckpt_every=2", "locality.pool_size=4"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the environment's python, a work folder outside the checkout, its environment
    variables): the built wheel installed with pip; its dependencies are this environment's
    packages, reached by a path entry (so this checkout's editable install is not)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("chatedit-*.whl")
    env = tmp / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    Path(site.stdout.strip(), "dependencies.pth").write_text(sysconfig.get_paths()["purelib"])
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    work = tmp / "work"
    work.mkdir()
    variables = {**os.environ, "CHATEDIT_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
    return python, work, variables


def test_the_wheel_holds_the_configs_and_editor_quick_works_outside_the_checkout(installed):
    python, work, variables = installed
    code = ("import chatedit, pathlib\n"
            f"assert not pathlib.Path(chatedit.__file__).is_relative_to({str(ROOT)!r})\n"
            "assert (pathlib.Path(chatedit.__file__).parent / 'conf' / 'config.yaml').exists()\n"
            "from chatedit import Editor\n"
            f"ed = Editor.quick('tiny-llama', train_overrides={QUICK!r})\n"
            "before = {n: m.weight.clone() for n, m in ed.modules.items()}\n"
            "result = ed.edit([{'prompt': 'Who wrote Dune?', 'target': 'Frank Herbert'}])\n"
            "assert result.n_facts == 1 and len(ed.history) == 1\n"
            "ed.rollback()\n"
            "assert all((m.weight == before[n]).all() for n, m in ed.modules.items())\n"
            "print('quick editor ok')\n")
    out = subprocess.run([python, "-c", code], cwd=work, env=variables, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "quick editor ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("script,override,shown", [
    ("chatedit-train", "model=tiny-llama", "name: tiny-llama"),
    ("chatedit-edit", "model=tiny-llama", "name: tiny-llama"),
    ("chatedit-eval", "model=tiny-llama", "name: tiny-llama"),
    ("chatedit-bench", "model=tiny-llama", "name: tiny-llama"),
    ("chatedit-align", "recipe.seed=3", "seed: 3")])
def test_console_scripts_compose_their_packaged_config(installed, script, override, shown):
    python, work, variables = installed
    out = subprocess.run([python.parent / script, override, "--cfg", "job"], cwd=work,
                         env=variables, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert shown in out.stdout


def test_the_collect_script_is_installed(installed):
    python, work, variables = installed
    out = subprocess.run([python.parent / "chatedit-collect", "--help"], cwd=work,
                         env=variables, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "usage" in out.stdout
