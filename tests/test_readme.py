"""The README's CPU commands run as printed: the two scripts' smoke runs, then plot_results.py on their outputs,
each a process of its own with /tmp/ moved into the test's folder. The scripts' docstrings give the same smoke
runs, so a change to one that leaves the other behind fails here too. And the README's recipe table gives the
values train_classifier.py's recipes hold, its Flags tables every flag of the three scripts with its default, and
Running `bench.py` every flag of bench.py.

Run: python -m pytest -q tests/test_readme.py (about 30 s on 2 CPU cores)
"""
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import bench
import mae_pretrain
import plot_results
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

    def run(command):
        argv = [arg.replace("/tmp/", f"{tmp_path}/") for arg in shlex.split(command)]
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        assert ": warning: " not in proc.stderr, (command, proc.stderr[-2000:])  # the project's own (utils.warn)

    # The two smoke runs share no file, so they run side by side (most of each is start-up, on one core); the plot
    # reads both.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(run, (*smoke["mae_pretrain"], *smoke["train_classifier"])))  # list(): raises what run raised
    run(*plot)
    assert {"mae.pt", "cls.pt", "cls_last.pt", "results.md"} <= set(os.listdir(tmp_path))
    figures = set(os.listdir(tmp_path / "mae_out")) | set(os.listdir(tmp_path / "cls_out"))
    assert {"loss_curve.png", "pretrain_monitor.png", "cls_val_acc_compare.png"} <= figures
    assert "scratch" in (tmp_path / "results.md").read_text()


def shown(value) -> str:
    """A parser default as the README's tables write it."""
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


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

    for flag, (finetune, plain) in rows.items():
        for cell, value in ((finetune, train_classifier.RECIPES["finetune"][flag]),
                            (plain, train_classifier.RECIPES["plain"][flag])):
            first = cell.split()[0].strip("`")
            assert first == shown(value) or (isinstance(value, float) and float(first) == value), (flag, cell, value)


def flag_table(readme: str, heading: str) -> tuple:
    """({flag: the cell of its default}, the section's text) from the `| flag | default | meaning |` table of the
    README's section that starts at `heading` (up to the next heading of that level); a row naming several flags
    gives each its own comma-separated part of the cell."""
    text = readme[readme.index(heading + "\n") + len(heading):]
    end = re.search(rf"^{heading.split()[0]} ", text, re.M)
    text = text[:end.start() if end else len(text)]
    table = text[text.index("| flag | default | meaning |"):].split("\n\n")[0]
    defaults = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        flags = [flag for flag in re.findall(r"`(--[a-z_-]+)`", cells[0]) if not flag.startswith("--no-")]
        parts = [part.strip() for part in cells[1].split(",")] if len(flags) > 1 else [cells[1]]
        assert len(parts) == len(flags), line
        defaults.update(zip(flags, parts))
    return defaults, text


@pytest.mark.parametrize("module, heading", [
    (mae_pretrain, "## Pretraining: `mae_pretrain.py`"),
    (train_classifier, "## Fine-tuning: from scratch vs from the MAE encoder, and the linear probe"),
    (plot_results, "## Figures and numbers of the report: `plot_results.py`")])
def test_the_readme_flag_tables_name_every_flag_with_its_default(module, heading):
    """Each script's Flags table names only flags its parser has, with the parser's default (a default of None is
    resolved at run time, from the device or the checkpoint, and its cell says how in words), and every flag the
    parser has is in that table or, for train_classifier.py, in its section's text (the recipe table, the flags it
    shares with mae_pretrain.py, whose defaults must then be the same where they are not None). A flag added,
    renamed or given another default without the README fails here."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    table, text = flag_table(readme, heading)
    actions = {action.option_strings[0]: action  # --compile for --compile/--no-compile
               for action in module.get_args_parser()._actions if action.option_strings != ["-h", "--help"]}
    unknown = set(table) - set(actions)
    assert not unknown, f"the README's Flags table under {heading!r} names flags the parser lacks: {unknown}"
    for flag, cell in table.items():
        default = actions[flag].default
        if default is not None:
            assert cell == shown(default) or (isinstance(default, float) and float(cell) == default), (flag, cell)
    pretrain_defaults = {action.option_strings[0]: action.default
                         for action in mae_pretrain.get_args_parser()._actions}
    for flag in set(actions) - set(table):
        named = module is train_classifier and f"`{flag}`" in text
        assert named, f"{flag} is missing from the Flags table under the README's {heading!r}"
        if actions[flag].default is not None:  # the model-size flags' None: from the checkpoint, or ViT-T
            assert actions[flag].default == pretrain_defaults[flag], flag


def test_the_readme_names_every_flag_of_bench():
    """Running `bench.py` names each of bench.py's flags; the model-size flags are those of mae_pretrain.py, and it
    says so once for all of them. A flag added to bench.py without a word in the README fails here."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    text = readme[readme.index("### Running `bench.py`"):readme.index("### Compile scope")]
    model_size = {"--patch_size", "--embed_dim", "--depth", "--num_heads", "--decoder_embed_dim", "--decoder_depth",
                  "--decoder_num_heads"}
    assert "the model-size flags of `mae_pretrain.py`" in text
    assert model_size <= {action.option_strings[0] for action in mae_pretrain.get_args_parser()._actions}
    unnamed = [action.option_strings[0] for action in bench.get_args_parser()._actions
               if action.option_strings[0] not in {"-h", *model_size}
               and not re.search(rf"{action.option_strings[0]}\b(?!-)", text)]
    assert unnamed == [], unnamed


def test_readme_counts_the_gpu_checks_pytest_collects():
    """The set-up section's count of tests/test_gpu.py's checks (each parametrized case one) and of its test
    functions, against pytest's own collection of the file (on a machine without CUDA it collects them all, then
    skips them)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    stated = re.search(r"The (\d+) checks in `tests/test_gpu.py` \((\d+) tests", text)
    assert stated, "the README no longer counts the GPU checks"
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "tests/test_gpu.py"], capture_output=True, text=True, cwd=ROOT)
    checks = [line for line in collected.stdout.splitlines() if line.startswith("tests/test_gpu.py::")]
    functions = {check.split("::")[1].split("[")[0] for check in checks}
    assert (int(stated[1]), int(stated[2])) == (len(checks), len(functions)), collected.stdout
