"""The README's CPU commands run as printed: the two scripts' smoke runs, then plot_results.py on their outputs,
each a process of its own with /tmp/ moved into the test's folder. The scripts' docstrings give the same smoke
runs, so a change to one that leaves the other behind fails here too. And the README's recipe table gives the
values train_classifier.py's recipes hold.

Run: python -m pytest -q tests/test_readme.py (about 30 s on 2 CPU cores)
"""
import os
import shlex
import subprocess
import sys

import mae_pretrain
import train_classifier
from conftest import ROOT


def commands(text: str, start: str) -> list:
    """Every indented command line of text that begins with `start`, its backslash continuations joined."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(start):
            command = line.strip()
            while command.endswith("\\"):
                i += 1
                command = command[:-1].rstrip() + " " + lines[i].strip()
            found.append(" ".join(command.split()))  # a docstring's backslash-newline is a continuation already
    return found


def test_the_readme_cpu_smoke_runs_and_plot_command_run_as_printed(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    smoke = {script: commands(readme, f"python {script}.py --device cpu --dataset fake")
             for script in ("mae_pretrain", "train_classifier")}
    plot = commands(readme, "python plot_results.py --pretrain_dir /tmp/")
    assert [len(found) for found in (*smoke.values(), plot)] == [1, 1, 1], (smoke, plot)
    for module in (mae_pretrain, train_classifier):  # the docstrings print the same command
        assert commands(module.__doc__, f"python {module.__name__}.py --device cpu") == smoke[module.__name__]

    for command in (*smoke["mae_pretrain"], *smoke["train_classifier"], *plot):
        argv = [arg.replace("/tmp/", f"{tmp_path}/") for arg in shlex.split(command)]
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        assert ": warning: " not in proc.stderr, (command, proc.stderr[-2000:])  # the project's own (utils.warn)
    assert {"mae.pt", "cls.pt", "cls_last.pt", "results.md"} <= set(os.listdir(tmp_path))
    figures = set(os.listdir(tmp_path / "mae_out")) | set(os.listdir(tmp_path / "cls_out"))
    assert {"loss_curve.png", "pretrain_monitor.png", "cls_val_acc_compare.png"} <= figures
    assert "scratch" in (tmp_path / "results.md").read_text()


def test_the_readme_recipe_table_gives_each_recipes_values():
    """The README's recipe table (Fine-tuning, Recipes) states each flag's value in `finetune` and `plain`, which
    train_classifier.RECIPES holds: a change to one without the other fails here. (finetune's layer decay, 0.75,
    applies from a pretrained encoder only, as its cell says.)"""
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = {}
    for line in readme.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1].startswith("`--"):
            rows[cells[1].split("`")[1].removeprefix("--")] = cells[2:4]
    assert set(rows) == set(train_classifier.RECIPE_FLAGS), rows

    def shown(value) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)
    for flag, (finetune, plain) in rows.items():
        for cell, value in ((finetune, train_classifier.RECIPES["finetune"][flag]),
                            (plain, train_classifier.RECIPES["plain"][flag])):
            first = cell.split()[0].strip("`")
            assert first == shown(value) or (isinstance(value, float) and float(first) == value), (flag, cell, value)
