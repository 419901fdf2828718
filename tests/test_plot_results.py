"""Tests of plot_results.py on the outputs of tiny --dataset fake runs: figures, numbers, missing inputs.

Run: python -m pytest -q tests/test_plot_results.py
"""
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import mae_pretrain
import plot_results
import train_classifier
from conftest import ROOT, TINY_MODEL, tiny_pretrain_argv

RUNS = ("scratch", "pretrained", "linprobe")
PRETRAIN_FIGURES = ("loss_curve.png", "pretrain_monitor.png", "best_recon.png", "last_recon.png")
CLS_FIGURES = ("cls_train_loss_compare.png", "cls_val_acc_compare.png", "confusion_matrix.png")


def classifier_argv(root, run, epochs, *extra):
    """Flags for a seconds-long train_classifier.py run on --dataset fake, writing into root/cls_outputs."""
    return ["--dataset", "fake", "--fake_size", "128", "--batch_size", "32", "--max_device_batch_size", "16",
            "--total_epoch", str(epochs), "--warmup_epoch", "1", "--device", "cpu", "--log_interval", "1",
            "--output_model_path", str(root / f"{run}.pt"), "--output_dir", str(root / "cls_outputs"),
            "--log_dir", str(root / "logs" / run), *TINY_MODEL, *extra]


@pytest.fixture(scope="module")
def run_outputs(tmp_path_factory):
    """Tiny real runs of both scripts: a 2-epoch MAE pretraining evaluated every epoch, then the classifier from
    scratch, fine-tuned from that checkpoint, and a linear probe of it (a different length, on purpose)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are far too small to gain from threads on a shared 2-core machine
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            argv = tiny_pretrain_argv(root, "--eval_every", "1", name="mae")
            mae_pretrain.main(mae_pretrain.get_args_parser().parse_args(argv))
            ckpt = str(root / "mae" / "mae.pt")
            for run, epochs, extra in (("scratch", 3, []), ("pretrained", 3, ["--pretrained_model_path", ckpt]),
                                       ("linprobe", 2, ["--pretrained_model_path", ckpt, "--linear_probe"])):
                argv = classifier_argv(root, run, epochs, *extra)
                train_classifier.main(train_classifier.get_args_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    return root / "mae" / "outputs", root / "cls_outputs"


def plot(*argv):
    """Run plot_results.py's main in-process; -> its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        plot_results.main(plot_results.get_args_parser().parse_args([str(a) for a in argv]))
    return out.getvalue()


def copy_outputs(run_outputs, dst):
    """A private copy of the run outputs, so a test's figures never leak into another test."""
    pre, cls = run_outputs
    shutil.copytree(pre, dst / "outputs")
    shutil.copytree(cls, dst / "cls_outputs")
    return dst / "outputs", dst / "cls_outputs"


@pytest.fixture(scope="module")
def full_report(run_outputs, tmp_path_factory):
    """plot_results.py run from the command line (a subprocess: no display, the real CLI) on all the outputs."""
    root = tmp_path_factory.mktemp("full")
    pre, cls = copy_outputs(run_outputs, root)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot_results.py"), "--pretrain_dir", pre,
                           "--cls_dir", cls, "--report", root / "results.md"],
                          capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return pre, cls, root / "results.md", proc.stdout


def comparison_title(fig) -> str:
    """A classifier comparison's title: the figure's, over its panels and its legend, else its axes'."""
    return fig._suptitle.get_text() if fig._suptitle else fig.axes[0].get_title()


def comparison_legend(fig) -> list:
    """A classifier comparison's legend entries, beside its last panel."""
    return [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]


def table_value(report: str, quantity: str) -> str:
    """The value cell of a `| quantity | value |` row of the report."""
    rows = [line for line in report.splitlines() if line.startswith(f"| {quantity} |")]
    assert len(rows) == 1, f"no single row {quantity!r}"
    return rows[0].split("|")[2].strip()


# ----------------------------------------------------------------------------------------------------------

def test_every_figure_is_a_valid_png_of_sensible_size(full_report):
    pre, cls, _, _ = full_report
    for path in [pre / f for f in PRETRAIN_FIGURES] + [cls / f for f in CLS_FIGURES]:
        with Image.open(path) as im:
            im.verify()  # checks the PNG structure and CRCs
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert 400 <= im.width <= 4000 and 300 <= im.height <= 4000, (path, im.size)
            if path.name not in ("best_recon.png", "last_recon.png"):  # those are the run's own figures, copied
                assert im.info["dpi"][0] == pytest.approx(200, abs=1)
    assert not list(pre.glob("*.tmp*")) and not list(cls.glob("*.tmp*"))
    # The names it checks for a folder in the way before drawing (plot_results' own lists) are the ones it wrote.
    assert {p.name for p in pre.glob("*.png") if not p.name.startswith("recon_epoch_")} == \
        set(plot_results.PRETRAIN_FIGURES) == set(PRETRAIN_FIGURES)
    assert {p.name for p in cls.glob("*.png") if "_preds_" not in p.name} == \
        set(plot_results.CLS_FIGURES) == set(CLS_FIGURES)


def test_a_figure_is_closed_whether_or_not_its_save_succeeds(tmp_path):
    """pyplot keeps every figure until it is closed: save_figure closes it after a save, and after a failed one."""
    plt = plot_results.plt
    for path in (tmp_path / "ok.png", tmp_path / "no_such_folder" / "fails.png"):
        fig = plt.figure()
        with contextlib.suppress(FileNotFoundError):
            plot_results.save_figure(fig, str(path), dpi=72)
        assert fig.number not in plt.get_fignums()
    assert [p.name for p in tmp_path.iterdir()] == ["ok.png"]


def test_best_and_last_recon_are_the_figures_of_those_epochs(full_report):
    pre, *_ = full_report
    losses = np.load(pre / "losses.npy").tolist()
    best = losses.index(min(losses)) + 1
    assert (pre / "best_recon.png").read_bytes() == (pre / f"recon_epoch_{best:03d}.png").read_bytes()
    assert (pre / "last_recon.png").read_bytes() == (pre / f"recon_epoch_{len(losses):03d}.png").read_bytes()


def test_pretraining_numbers_equal_those_of_the_npy_files(full_report):
    pre, _, report_path, stdout = full_report
    report = report_path.read_text()
    losses = np.load(pre / "losses.npy").tolist()
    best = losses.index(min(losses))
    assert table_value(report, "epochs") == str(len(losses))
    assert table_value(report, "first 5 losses") == ", ".join(f"{v:.5f}" for v in losses[:5])
    assert table_value(report, "last 5 losses") == ", ".join(f"{v:.5f}" for v in losses[-5:])
    assert table_value(report, "best loss (epoch)") == f"{losses[best]:.5f} ({best + 1})"
    assert table_value(report, "final loss") == f"{losses[-1]:.5f}"
    assert f"best loss {losses[best]:.5f} at epoch {best + 1}" in stdout

    epochs = [int(e) for e in np.load(pre / "eval_epochs.npy")]
    knn = np.load(pre / "knn_acc.npy").tolist()
    assert len(epochs) == len(knn) == 2
    b = knn.index(max(knn))
    assert table_value(report, "kNN top-1 on val, final (epoch)") == f"{100 * knn[-1]:.2f}% ({epochs[-1]})"
    assert table_value(report, "kNN top-1 on val, best (epoch)") == f"{100 * knn[b]:.2f}% ({epochs[b]})"
    psnr = np.load(pre / "val_psnr.npy").tolist()
    b = psnr.index(max(psnr))
    assert table_value(report, "val PSNR of masked patches, best (epoch)") == f"{psnr[b]:.2f} dB ({epochs[b]})"


def test_report_names_the_pretrained_model_and_reads_the_files_the_scripts_write(full_report):
    """The report's caption says which MAE made the numbers (a smaller decoder's report looks the same
    otherwise), and the file names plot_results reads are the ones the scripts write."""
    pre, _, report_path, _ = full_report
    args = json.loads((pre / "args.json").read_text())
    caption = (f"encoder {args['embed_dim']} x {args['depth']} blocks, decoder {args['decoder_embed_dim']} x "
               f"{args['decoder_depth']}, patch {args['patch_size']}")
    assert caption in report_path.read_text()
    assert plot_results.MONITOR_FILES == ("eval_epochs", *mae_pretrain.EVAL_METRICS)
    assert set(plot_results.LOWER_IS_BETTER) <= set(mae_pretrain.EVAL_METRICS)
    undrawn = set(mae_pretrain.EVAL_METRICS) - {"val_loss"} - set(plot_results.MONITOR_PANELS)
    assert not undrawn, f"no panel of the monitor figure draws {undrawn}: give each one in MONITOR_PANELS"
    assert plot_results.RUN_CURVES == train_classifier.CURVES


def test_a_run_stopped_before_its_total_epoch_reads_as_such_in_the_report_and_the_output(run_outputs, full_report,
                                                                                          tmp_path):
    """A run stopped by --stop_after (or a time limit) beside finished ones would be compared as if complete: its
    epochs read "2 of 5" in the report's tables, in what the script prints, and in the loss curve's title; a
    finished run's read as before, and one epoch is "1 epoch"."""
    _, _, report_path, out = full_report
    assert "pretraining (" in out and ": 2 epochs, best loss" in out and "(3 epochs)" in out and " of " not in out
    assert "| epochs | 2 |" in report_path.read_text()

    pre, cls = copy_outputs(run_outputs, tmp_path)
    args = json.loads((pre / "args.json").read_text())
    (pre / "args.json").write_text(json.dumps({**args, "total_epoch": 5}))
    summary = json.loads((cls / "scratch_summary.json").read_text())
    (cls / "scratch_summary.json").write_text(json.dumps({**summary, "total_epoch": 4}))
    out = plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "results.md")
    report = (tmp_path / "results.md").read_text()
    assert ": 2 of 5 epochs, best loss" in out and "| epochs | 2 of 5 |" in report
    scratch_row = next(line for line in report.splitlines() if line.startswith("| scratch |"))
    assert scratch_row.split("|")[5].strip() == "3 of 4" and "scratch (from scratch): best val acc" in out
    assert next(line for line in out.splitlines() if line.startswith("scratch ")).endswith("(3 of 4 epochs)")
    assert next(line for line in out.splitlines() if line.startswith("pretrained ")).endswith("(3 epochs)")
    pretraining = plot_results.load_pretraining(str(pre), [], [])
    fig = plot_results.plot_loss_curve(pretraining, False)
    assert fig.axes[0].get_title().endswith("(2 of 5 epochs)")
    plot_results.plt.close(fig)
    assert plot_results.epochs_text(1, None) == plot_results.epochs_text(1, 1) == "1 epoch"


def test_report_names_the_encoder_the_runs_started_from_and_notes_when_they_differ(run_outputs, full_report,
                                                                                      tmp_path):
    """The fine-tune and the probe of one MAE checkpoint are listed under its path and its encoder's digest (the
    one train_classifier.py computed); runs whose encoders differ (the checkpoint rewritten between them) get a
    note in the output and the report. The digest, not the path, tells: a checkpoint moved between the runs is
    listed under both paths, with no note."""
    import utils
    pre, cls, report_path, _ = full_report
    ckpt = run_outputs[0].parent / "mae.pt"  # where run_outputs' pretraining wrote it
    digest = utils.encoder_digest(torch.load(ckpt, weights_only=True)["model"])[:12]
    assert (f"`pretrained`, `linprobe` started from the MAE encoder of `{ckpt}` (its weights' SHA-256 "
            f"`{digest}`).") in report_path.read_text()
    assert "different MAE encoders" not in report_path.read_text()

    pre, cls = copy_outputs(run_outputs, tmp_path)
    summary = json.loads((cls / "linprobe_summary.json").read_text())
    (cls / "linprobe_summary.json").write_text(json.dumps({**summary, "pretrained_sha256": "0" * 64}))
    out = plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "results.md")
    note = (f"the classifier runs started from different MAE encoders (pretrained: {ckpt}, SHA-256 {digest}; "
            f"linprobe: {ckpt}, SHA-256 000000000000): their numbers are not one experiment's")
    assert f"note: {note}" in out and note in (tmp_path / "results.md").read_text()

    moved = str(tmp_path / "elsewhere" / "mae.pt")
    (cls / "linprobe_summary.json").write_text(json.dumps({**summary, "pretrained_model_path": moved}))
    out = plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "results.md")
    report = (tmp_path / "results.md").read_text()
    assert "different MAE encoders" not in out and "different MAE encoders" not in report
    for names, path in (("`pretrained`", ckpt), ("`linprobe`", moved)):
        assert f"{names} started from the MAE encoder of `{path}` (its weights' SHA-256 `{digest}`)." in report


def test_classifier_numbers_equal_those_of_the_npy_files(full_report):
    _, cls, report_path, stdout = full_report
    report = report_path.read_text()
    for run in RUNS:
        acc = np.load(cls / f"{run}_val_acc.npy").tolist()
        best = acc.index(max(acc))  # the earliest of equal bests
        row = [line for line in report.splitlines() if line.startswith(f"| {run} |")]
        assert len(row) == 1
        cells = [c.strip() for c in row[0].split("|")[1:-1]]
        assert cells[2] == ("linear probe" if run == "linprobe" else "finetune")  # a probe has no augmentation
        assert cells[3] == "fake (synthetic val set)"
        assert cells[4] == str(len(acc))
        assert cells[5] == f"{100 * acc[best]:.2f}% ({best + 1})"
        assert cells[6] == f"{100 * acc[-1]:.2f}%"
        assert cells[7] == f"{np.load(cls / f'{run}_train_loss.npy')[-1]:.4f}"
        assert f"best val acc {100 * acc[best]:.2f}% at epoch {best + 1}" in stdout
        # The summary json (a convenience) agrees with the arrays the numbers come from.
        summary = json.load(open(cls / f"{run}_summary.json"))
        assert summary["best_val_acc"] == pytest.approx(acc[best]) and summary["best_epoch"] == best + 1
        assert summary["final_val_acc"] == pytest.approx(acc[-1]) and summary["epochs"] == len(acc)
    probe = np.load(cls / "linprobe_val_acc.npy").tolist()
    best = probe.index(max(probe))
    assert (f"Linear-probe accuracy (`linprobe`): {100 * probe[best]:.2f}% best (epoch {best + 1}), "
            f"{100 * probe[-1]:.2f}% final.") in report


def gain_points(mae: float, baseline: float) -> str:
    """A headline difference as the report writes it, from two accuracies in [0, 1]."""
    return f"{100 * (mae - baseline):+.2f} points ({100 * mae:.2f}% against {100 * baseline:.2f}%)"


def test_the_report_says_what_the_pretraining_is_worth_from_the_two_fine_tunes_arrays(full_report):
    """The headline: the fine-tune from the MAE encoder minus the one from scratch, final and best val accuracy in
    points, written out from their .npy files (the probe is no fine-tune and takes no part)."""
    _, cls, report_path, stdout = full_report
    scratch, pretrained = (np.load(cls / f"{run}_val_acc.npy") for run in ("scratch", "pretrained"))
    gain = (f"from the MAE encoder against from scratch (pretrained - scratch): final val acc "
            f"{gain_points(pretrained[-1], scratch[-1])}, best {gain_points(pretrained.max(), scratch.max())}")
    assert f"What the pretraining is worth: {gain}." in report_path.read_text()
    assert f"what the pretraining is worth: {gain}" in stdout


def test_what_the_pretraining_is_worth_is_not_given_for_fine_tunes_that_did_not_run_alike(run_outputs, tmp_path):
    """A fine-tune stopped early, or on other data or at another size, would make the difference mislead (a
    pretrained run stopped at epoch 1 would read as pretraining worth less): the report says why it gives none."""
    pre, cls = copy_outputs(run_outputs, tmp_path)
    np.save(cls / "pretrained_val_acc.npy", np.load(cls / "pretrained_val_acc.npy")[:1])
    args = json.loads((cls / "scratch_args.json").read_text())
    (cls / "scratch_args.json").write_text(json.dumps({**args, "val_split": 100}))
    out = plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "results.md")
    gain = "not given, as the two fine-tunes (pretrained, scratch) differ in epochs, val split"
    assert f"what the pretraining is worth: {gain}" in out
    assert f"What the pretraining is worth: {gain}." in (tmp_path / "results.md").read_text()


def test_a_random_encoder_probe_is_the_probes_baseline_and_the_report_says_what_the_pretraining_is_worth_to_it(
        run_outputs, tmp_path):
    """--random_probe_run names the probe of a random encoder (--linear_probe without --pretrained_model_path; by
    default linprobe_random, where it is): the report tables and draws it beside the MAE encoder's probe, and gives
    the probes' difference, written out from both runs' .npy files, after the fine-tunes'. Each probe keeps its
    colour whichever flag names it. Probes of different features (the class token against the mean patch token) or
    recipes give no difference, and the report says why."""
    _, cls = copy_outputs(run_outputs, tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            argv = classifier_argv(tmp_path, "linprobe_random", 2, "--linear_probe", "--run_name", "linprobe_random")
            train_classifier.main(train_classifier.get_args_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    # Read by default: the README's name for it, found in --cls_dir.
    out = plot("--pretrain_dir", tmp_path / "none", "--cls_dir", cls, "--report", tmp_path / "results.md")
    report = (tmp_path / "results.md").read_text()
    assert "| linprobe_random | random encoder, linear probe | linear probe |" in report
    mae, random = (np.load(cls / f"{run}_val_acc.npy") for run in ("linprobe", "linprobe_random"))
    gain = (f"under a linear probe, the MAE encoder against a random one (linprobe - linprobe_random): final val acc "
            f"{gain_points(mae[-1], random[-1])}, best {gain_points(mae.max(), random.max())}")
    worth = [line for line in report.splitlines() if line.startswith("What the pretraining is worth: ")]
    assert len(worth) == 2 and worth[0].startswith("What the pretraining is worth: from the MAE encoder against "
                                                   "from scratch (pretrained - scratch)")
    assert worth[1] == f"What the pretraining is worth: {gain}."
    assert f"what the pretraining is worth: {gain}" in out

    def random_probe(cls_dir, *argv):
        return plot_results.random_probe_name(plot_results.get_args_parser().parse_args(
            ["--cls_dir", str(cls_dir), *argv]))
    assert random_probe(cls) == "linprobe_random" and random_probe(cls, "--random_probe_run", "mine") == "mine"
    assert random_probe(cls, "--random_probe_run", "") == ""  # left out
    assert random_probe(run_outputs[1]) == ""  # not there: nothing is missing
    (tmp_path / "preds_only").mkdir()
    np.save(tmp_path / "preds_only" / "linprobe_random_val_preds.npy", np.zeros(4, dtype=np.int64))
    assert random_probe(tmp_path / "preds_only") == ""  # no curve: no run, as load_classifier_run reads one
    assert random_probe(cls, "--linprobe_run", "linprobe_random") == ""  # named by another flag (older usage)

    # Each probe is drawn in its own style, whichever flag named it.
    def drawn(roles):
        runs = [plot_results.load_classifier_run(str(cls), name, role, [], [])
                for name, role in zip(("linprobe", "linprobe_random"), roles)]
        fig = plot_results.plot_run_comparison(runs, "val_acc", False)
        plot_results.plt.close(fig)
        ax = fig.axes[0]
        styles = [(line.get_color(), line.get_linestyle()) for line in ax.lines[::2]]  # each curve, then its star
        legend = [t.get_text().split("\n")[0] for t in ax.get_legend().get_texts()]
        return comparison_title(fig).split("\n")[0], legend, styles, runs
    title, legend, styles, runs = drawn(("linprobe", "random_probe"))
    assert title == "Validation accuracy: linear probe, MAE-pretrained vs random encoder"
    assert legend == ["MAE-pretrained, linear probe", "random encoder, linear probe"]  # default names: no "(name)"
    assert styles == [(plot_results.GREEN, "-."), (plot_results.PURPLE, ":")]
    assert drawn(("random_probe", "linprobe"))[2] == styles
    # Under another name than its flag's default, a run is named in the legend too.
    fig = plot_results.plot_run_comparison([runs[0], dataclasses.replace(runs[1], name="mine")], "val_acc", False)
    plot_results.plt.close(fig)
    assert comparison_legend(fig)[1].startswith("random encoder, linear probe (mine)\n")

    # The settings compared come from args.json: a run without its summary (labelled by its flag) is compared too.
    assert plot_results.pretraining_gains([dataclasses.replace(runs[0], summary={}), runs[1]]) == [gain]
    # Two MAE probes named (one by --random_probe_run): no difference, and the line says why.
    two_mae_probes = [runs[0], dataclasses.replace(runs[0], name="linprobe_avg"), runs[1]]
    assert plot_results.pretraining_gains(two_mae_probes) == [
        "not given for the linear probes, as linprobe and linprobe_avg are each a run of 'MAE-pretrained, linear "
        "probe'"]
    runs[1] = dataclasses.replace(runs[1], args={**runs[1].args, "global_pool": "avg", "recipe": "plain"})
    assert plot_results.pretraining_gains(runs) == [
        "not given, as the two linear probes (linprobe, linprobe_random) differ in pooling, recipe"]


def test_per_class_accuracy_is_counted_from_the_predictions(full_report):
    _, cls, report_path, _ = full_report
    report = report_path.read_text()
    classes = json.load(open(cls / "pretrained_summary.json"))["classes"]
    for column, run in enumerate(RUNS, start=1):
        preds, labels = np.load(cls / f"{run}_val_preds.npy"), np.load(cls / f"{run}_val_labels.npy")
        for c, name in enumerate(classes):
            total = sum(1 for t in labels if t == c)
            right = sum(1 for p, t in zip(preds, labels) if t == c and p == t)
            cell = [line for line in report.splitlines() if line.startswith(f"| {name} |")][0].split("|")[1 + column]
            assert cell.strip() == (f"{100 * right / total:.2f}%" if total else "n/a")


def test_report_embeds_every_figure_by_relative_path(full_report):
    pre, cls, report_path, stdout = full_report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_path.read_text())
    assert all(not os.path.isabs(link) for link in links)
    resolved = {os.path.realpath(report_path.parent / link) for link in links}
    expected = [pre / f for f in PRETRAIN_FIGURES] + [cls / f for f in (*CLS_FIGURES, "pretrained_preds_grid.png")]
    assert resolved == {os.path.realpath(p) for p in expected}
    assert "missing" not in stdout.lower() and "## Missing inputs" not in report_path.read_text()


def test_the_best_epoch_is_the_earliest_of_equal_bests():
    run = plot_results.ClassifierRun("r", "scratch", {"val_acc": np.array([0.1, 0.3, 0.3, 0.2])}, {})
    assert plot_results.run_numbers(run) == {"epochs": 4, "best_val_acc": 0.3, "best_epoch": 2, "final_val_acc": 0.2}


def test_a_monitor_metric_is_best_at_its_lowest_or_highest_as_it_should_be():
    """val_loss (LOWER_IS_BETTER) is best at its minimum, the others at their maximum; the earliest on ties. The
    monitor figure and the report both take their best points from best_index."""
    values = np.array([0.4, 0.2, 0.9, 0.2, 0.9])
    assert plot_results.best_index("val_loss", values) == 1
    assert plot_results.best_index("knn_acc", values) == plot_results.best_index("val_psnr", values) == 2


def test_a_run_that_did_not_start_from_the_pretrainings_last_encoder_gets_a_note(run_outputs, full_report, tmp_path):
    """Each line of the pretraining's log.jsonl names its epoch's checkpointed encoder: a fine-tune that started
    from an earlier epoch's (run while the pretraining went on), or from one the pretraining never wrote (a rerun
    of it since), is named in a note; a log whose lines name none (an older run's) gets none."""
    import utils
    pre, _, report_path, out = full_report
    records = [json.loads(line) for line in (pre / "log.jsonl").read_text().splitlines()]
    ckpt = run_outputs[0].parent / "mae.pt"
    digest = utils.encoder_digest(torch.load(ckpt, weights_only=True)["model"])
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["encoder_sha256"] == digest
    assert "pretraining in" not in out and "pretraining in" not in report_path.read_text()

    pre, cls = copy_outputs(run_outputs, tmp_path)
    cases = (([digest, "1" * 64], f"pretrained, linprobe started from the encoder of epoch 1 of the pretraining in "
                                  f"{pre}, not of its last epoch (2), which the pretraining section reports"),
             (["1" * 64, "2" * 64], f"pretrained, linprobe started from an MAE encoder ({ckpt}, SHA-256 "
                                    f"{digest[:12]}) that the pretraining in {pre} never wrote: the pretraining "
                                    "reported here is not theirs"),
             ([digest, None], None))
    for digests, note in cases:
        lines = [{**r, "encoder_sha256": d} if d else {k: v for k, v in r.items() if k != "encoder_sha256"}
                 for r, d in zip(records, digests)]
        (pre / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        out = plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "results.md")
        if note:
            assert f"note: {note}" in out and f"- {note}" in (tmp_path / "results.md").read_text()
        else:
            assert "pretraining in" not in out



@pytest.mark.parametrize("num_epochs, left", [(12, 0.5), (30, 0.5), (150, 0.0)])
def test_every_epoch_axis_starts_alike(num_epochs, left):
    """The loss curve, every panel of the monitor and the classifier comparison share one rule: a short run keeps
    half an epoch clear before its first point, a long one starts at 0; each ends past its last epoch."""
    losses = np.linspace(0.3, 0.1, num_epochs)
    eval_epochs = np.array([num_epochs // 2, num_epochs])
    evals = {"knn_acc": np.array([0.3, 0.4]), "val_loss": np.array([0.2, 0.15]), "val_psnr": np.array([10.0, 12.0])}
    pre = plot_results.Pretraining("pre", losses, {}, [], eval_epochs, evals)
    run = plot_results.ClassifierRun("scratch", "scratch", {"val_acc": np.linspace(0.1, 0.5, num_epochs)}, {})
    figures = [plot_results.plot_loss_curve(pre, False), plot_results.plot_monitor(pre, False),
               plot_results.plot_run_comparison([run], "val_acc", False)]
    axes = [ax for fig in figures for ax in fig.axes]
    assert len(axes) == 5
    for ax in axes:
        low, high = ax.get_xlim()
        assert low == left and num_epochs < high <= 1.04 * num_epochs + 1, (ax.get_title(), low, high)
    for fig in figures:
        plot_results.plt.close(fig)


@pytest.mark.parametrize("num_epochs, ticks", [(1, [1]), (12, [2, 4, 6, 8, 10, 12]),
                                               (37, [0, 5, 10, 15, 20, 25, 30, 35]),
                                               (100, [0, 20, 40, 60, 80, 100]), (150, [0, 25, 50, 75, 100, 125, 150])])
def test_epoch_axes_are_ticked_at_round_whole_epochs_the_last_among_them_when_it_can_be(num_epochs, ticks):
    """matplotlib's MaxNLocator(integer=True) ticked a 1-epoch run at 0.6, 0.8, ..., 1.4, leaving epoch 1 itself
    unlabelled, and a 150-epoch run up to 140: each axis is ticked every 1, 2, 5, 10, 20, 25, 50, ... epochs, at
    most 8 ticks, the step dividing the number of epochs when one does."""
    pre = plot_results.Pretraining("pre", np.linspace(0.3, 0.1, num_epochs), {}, [])
    fig = plot_results.plot_loss_curve(pre, False)
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    assert [t for t in ax.get_xticks() if low <= t <= high] == ticks
    assert ax.get_title().endswith(f"({num_epochs} epoch{'s' if num_epochs > 1 else ''})")
    plot_results.plt.close(fig)


def test_the_best_pretraining_epoch_is_the_earliest_of_equal_losses():
    """As for an accuracy, the earliest of equal bests: its reconstructions are the ones best_recon.png copies."""
    pre = plot_results.Pretraining("pre", np.array([0.5, 0.3, 0.4, 0.3]), {}, [])
    assert pre.best_epoch == 2
    assert (plot_results.pretrain_numbers(pre)["best_loss"], plot_results.pretrain_numbers(pre)["best_epoch"]) == (
        0.3, 2)


def test_runs_whose_encoders_differ_in_size_get_a_note(run_outputs, full_report, tmp_path):
    """The README's smoke runs once trained the scratch classifier at another size than the MAE it compared with,
    without a word: the sizes each run's args.json records must agree, or a note says how they differ."""
    _, _, report_path, out = full_report
    assert "differ in size" not in out and "differ in size" not in report_path.read_text()
    pre, cls = copy_outputs(run_outputs, tmp_path)
    args = json.loads((cls / "scratch_args.json").read_text())
    (cls / "scratch_args.json").write_text(json.dumps({**args, "embed_dim": 2 * args["embed_dim"]}))
    out = plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "results.md")
    size = f"patch {args['patch_size']}, width {{}}, {args['depth']} blocks, {args['num_heads']} heads"
    note = (f"the classifier runs' encoders differ in size (scratch: {size.format(2 * args['embed_dim'])}; "
            f"pretrained, linprobe: {size.format(args['embed_dim'])}): their accuracies compare different models")
    assert f"note: {note}" in out and note in (tmp_path / "results.md").read_text()


def test_a_run_is_labelled_by_what_its_summary_says_it_trained_from():
    """The label comes from the summary, not the flag that named the run: a run named by --scratch_run that
    started from an MAE checkpoint is the pretrained fine-tune, one named by --pretrained_run without a checkpoint
    is from scratch; without a summary, the flag's role."""
    def label(role, summary):
        return plot_results.ClassifierRun("r", role, {}, summary).label
    assert label("scratch", {"pretrained_model_path": "mae.pt", "linear_probe": False}) == "MAE-pretrained, fine-tuned"
    assert label("pretrained", {"pretrained_model_path": "", "linear_probe": False}) == "from scratch"
    assert label("pretrained", {}) == "MAE-pretrained, fine-tuned" and label("scratch", {}) == "from scratch"


def test_per_class_accuracy_lists_the_runs_of_the_first_runs_classes_and_na_for_a_class_without_images():
    """The per-class table's columns are the runs with the first run's classes (another run's classes would not
    line up with its rows), and a line under it names the others; a class with no val image reads n/a, not nan%."""
    first = plot_results.ClassifierRun("a", "scratch", {}, {}, preds=np.array([0, 1, 1, 0]),
                                       labels=np.array([0, 1, 1, 1]), classes=["cat", "dog", "eel"])
    other = plot_results.ClassifierRun("b", "pretrained", {}, {}, preds=np.array([0, 1]), labels=np.array([0, 1]),
                                       classes=["x", "y"])
    report = plot_results.report_classifiers([first, other], {}, str)
    at = report.index("Per-class val accuracy (last epoch):")
    assert report[at + 2:at + 10] == ["| class | a |", "| --- | --- |", "| cat | 100.00% |", "| dog | 66.67% |",
                                      "| eel | n/a |", "", "Left out of that table: `b`, on other classes than `a`'s.",
                                      ""]


def test_the_training_loss_figure_follows_the_summarys_linear_probe(run_outputs, tmp_path, monkeypatch):
    """A run named by --linprobe_run whose summary says it was fine-tuned (linear_probe false) has the recipe's loss
    and is drawn with the fine-tunes: the summary, not the flag, says what the run is."""
    pre, cls = copy_outputs(run_outputs, tmp_path)
    summary = json.loads((cls / "linprobe_summary.json").read_text())
    (cls / "linprobe_summary.json").write_text(json.dumps({**summary, "linear_probe": False}))
    drawn, real = {}, plot_results.plot_run_comparison
    monkeypatch.setattr(plot_results, "plot_run_comparison",
                        lambda runs, curve, log_scale: drawn.setdefault(curve, [r.name for r in runs]) and
                        real(runs, curve, log_scale))
    plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "r.md")
    assert drawn["train_loss"] == ["scratch", "pretrained", "linprobe"]


def test_a_comparisons_data_caption_comes_from_the_runs_it_draws():
    """The accuracy figure's caption names the data of the runs drawn on it: a run without val accuracy (another
    dataset) draws nothing there and does not take the caption away."""
    runs = [plot_results.ClassifierRun("scratch", "scratch", {"val_acc": np.array([0.3, 0.4])}, {},
                                       args={"dataset": "fake", "val_split": 0}),
            plot_results.ClassifierRun("pretrained", "pretrained", {"train_loss": np.array([2.0, 1.0])}, {},
                                       args={"dataset": "cifar10", "val_split": 0})]
    fig = plot_results.plot_run_comparison(runs, "val_acc", False)
    plot_results.plt.close(fig)
    assert comparison_title(fig) == ("Validation accuracy: from scratch\nsynthetic images (--dataset fake); val: "
                                       "synthetic val set")


def test_an_accuracy_of_100_percent_stays_on_an_axis_that_ends_at_100(run_outputs):
    pre = plot_results.load_pretraining(str(run_outputs[0]), [], [])
    pre.evals["knn_acc"] = np.array([0.5, 1.0])  # a perfect kNN, as on separable synthetic data
    ax = plot_results.plot_monitor(pre, log_scale=False).axes[-1]
    low, high = ax.get_ylim()
    assert 100 <= high <= 100 + 0.025 * (100 - low)  # room for the star, no 104% tick
    assert max(t for t in ax.get_yticks() if low <= t <= high) <= 100
    label, = ax.texts
    assert label.get_text() == "best 100.00% (epoch 2)" and label.get_va() == "top"  # below the point: no room above


def test_the_training_loss_figure_leaves_out_the_probe(run_outputs, tmp_path, monkeypatch):
    """The probe's loss is cross-entropy on clean labels, the fine-tunes' on the recipe's mixed, smoothed targets."""
    pre, cls = copy_outputs(run_outputs, tmp_path)
    drawn, real = {}, plot_results.plot_run_comparison
    monkeypatch.setattr(plot_results, "plot_run_comparison",
                        lambda runs, curve, log_scale: drawn.setdefault(curve, [r.name for r in runs]) and
                        real(runs, curve, log_scale))
    plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "r.md")
    assert drawn == {"train_loss": ["scratch", "pretrained"], "val_acc": ["scratch", "pretrained", "linprobe"]}
    # So --log_scale, which refuses a drawn loss <= 0, takes one in the probe's loss: that curve is not drawn.
    np.save(cls / "linprobe_train_loss.npy", np.array([0.0, 0.5]))
    plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "r.md", "--log_scale")


def test_a_best_epoch_picked_on_the_test_set_is_flagged():
    def report(args):
        run = plot_results.ClassifierRun("scratch", "scratch", {"val_acc": np.array([0.5, 0.6, 0.55])}, {}, args=args)
        return "\n".join(plot_results.report_classifiers([run], {}, str))
    assert "picked on the test set itself: its final epoch's accuracy is the unbiased one" in report(
        {"dataset": "cifar10", "val_split": 0})
    assert "picked on the test set" not in report({"dataset": "cifar10", "val_split": 5000})
    assert "picked on the test set" not in report({"dataset": "fake", "val_split": 0})
    runs = [plot_results.ClassifierRun(name, name, {}, {}, args={"dataset": "cifar100", "val_split": 0})
            for name in ("scratch", "pretrained")]
    assert plot_results.test_split_sentence(runs) == (
        "The val splits of `scratch`, `pretrained` are the test set, so their best epochs were picked on the test set "
        "itself: their final epochs' accuracies are the unbiased ones. Tune with `--val_split` instead.")


def test_a_best_epoch_picked_on_the_test_set_is_printed_too(run_outputs, tmp_path):
    """The script's printed short form carries that warning as a note, as the report does."""
    pre, cls = copy_outputs(run_outputs, tmp_path)
    args = json.loads((cls / "scratch_args.json").read_text())
    (cls / "scratch_args.json").write_text(json.dumps({**args, "dataset": "cifar10", "val_split": 0}))
    printed = plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "r.md").splitlines()
    assert ("note: the val split of scratch is the test set, so its best epoch was picked on the test set itself: its "
            "final epoch's accuracy is the unbiased one. Tune with --val_split instead.") in printed
    assert "The val split of `scratch` is the test set" in (tmp_path / "r.md").read_text()


def test_top_confusions_rank_by_share_then_by_images():
    labels = np.array([0] * 4 + [1] * 2 + [2] * 4)
    preds = np.array([1, 1, 0, 0] + [2, 2] + [0, 0, 2, 2])  # 0 -> 1: 2 of 4; 1 -> 2: 2 of 2; 2 -> 0: 2 of 4
    run = plot_results.ClassifierRun("r", "scratch", {}, {}, preds=preds, labels=labels, classes=["a", "b", "c"])
    assert plot_results.top_confusions(run, count=2) == [("b", "c", 100.0, 2), ("a", "b", 50.0, 2)]
    preds[8:] = 0  # now 2 -> 0 is 4 of 4: the same share as 1 -> 2, with more images, so it comes first
    assert [(t, p, c) for t, p, _, c in plot_results.top_confusions(run, count=2)] == [("c", "a", 4), ("b", "c", 2)]
    preds[6:] = [0, 0, 0, 2]  # 2 -> 0: 3 of 4, more images than 1 -> 2's 2 of 2 but a smaller share: it comes second
    assert [(t, p, c) for t, p, _, c in plot_results.top_confusions(run, count=2)] == [("b", "c", 2), ("c", "a", 3)]


def sparse_pretraining():
    """A 7-epoch pretraining evaluated at epochs 2, 4 and 6 only (as with --eval_every 2 and a run stopped at 7):
    the lowest loss at epoch 6, the kNN's best tied at epochs 4 and 6, the val loss lowest at 4 and highest at 2."""
    losses = np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.52, 0.55])
    evals = {"knn_acc": np.array([0.4, 0.6, 0.6]), "val_loss": np.array([0.5, 0.3, 0.4]),
             "val_psnr": np.array([10.0, 12.0, 11.0])}
    return plot_results.Pretraining("pre", losses, {}, [], np.array([2, 4, 6]), evals)


def test_pretraining_numbers_take_each_metric_at_its_own_best_evaluated_epoch():
    """First and last five losses of seven, the lowest (epoch 6) and the last; each monitor metric's final value at
    the last evaluated epoch (6, not the run's 7) and its best at the epoch evaluated then: the lowest val loss, the
    highest PSNR and kNN accuracy, the earliest of equal bests."""
    n = plot_results.pretrain_numbers(sparse_pretraining())
    assert n["epochs"] == 7 and n["first5"].tolist() == [0.9, 0.8, 0.7, 0.65, 0.6]
    assert n["last5"].tolist() == [0.7, 0.65, 0.6, 0.52, 0.55]
    assert (n["best_loss"], n["best_epoch"], n["final_loss"]) == (0.52, 6, 0.55)
    assert n["knn_acc"] == {"final": 0.6, "final_epoch": 6, "best": 0.6, "best_epoch": 4}
    assert n["val_loss"] == {"final": 0.4, "final_epoch": 6, "best": 0.3, "best_epoch": 4}
    assert n["val_psnr"] == {"final": 11.0, "final_epoch": 6, "best": 12.0, "best_epoch": 4}


def test_every_point_is_drawn_at_its_own_epoch():
    """The points of each figure, read off its lines: the training loss at epochs 1 to 7, the monitor's val loss,
    PSNR and kNN accuracy (in %) at the evaluated epochs 2, 4 and 6, not at 1 to 3, each best point's star at its
    epoch; a classifier comparison's curves at epochs 1 to E of each run, the best starred at its epoch: the
    highest accuracy, the lowest training loss (a loss's star at its highest point would mark the worst epoch)."""
    def points(line):
        return [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]
    pre = sparse_pretraining()
    losses = (list(range(1, 8)), pre.losses.tolist())
    assert [points(line) for line in plot_results.plot_loss_curve(pre, False).axes[0].lines] == [
        losses, ([6], [0.52])]
    loss_ax, psnr_ax, knn_ax = plot_results.plot_monitor(pre, False).axes
    assert [points(line) for line in loss_ax.lines] == [losses, ([2, 4, 6], [0.5, 0.3, 0.4]), ([4], [0.3])]
    assert [points(line) for line in psnr_ax.lines] == [([2, 4, 6], [10.0, 12.0, 11.0]), ([4], [12.0])]
    assert [points(line) for line in knn_ax.lines] == [([2, 4, 6], [40.0, 60.0, 60.0]), ([4], [60.0])]
    runs = [plot_results.ClassifierRun("scratch", "scratch", {"val_acc": np.array([0.25, 0.5, 0.75, 0.5])}, {}),
            plot_results.ClassifierRun("pretrained", "pretrained", {"val_acc": np.array([0.5, 0.25])}, {})]
    ax = plot_results.plot_run_comparison(runs, "val_acc", False).axes[0]
    assert [points(line) for line in ax.lines] == [([1, 2, 3, 4], [25.0, 50.0, 75.0, 50.0]), ([3], [75.0]),
                                                   ([1, 2], [50.0, 25.0]), ([1], [50.0])]
    runs = [plot_results.ClassifierRun("scratch", "scratch", {"train_loss": np.array([2.0, 1.0, 1.5, 1.25])}, {}),
            plot_results.ClassifierRun("pretrained", "pretrained", {"train_loss": np.array([0.75, 0.5])}, {})]
    ax = plot_results.plot_run_comparison(runs, "train_loss", False).axes[0]
    assert [points(line) for line in ax.lines] == [([1, 2, 3, 4], [2.0, 1.0, 1.5, 1.25]), ([2], [1.0]),
                                                   ([1, 2], [0.75, 0.5]), ([2], [0.5])]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "from scratch\nbest 1.0000 at epoch 2", "MAE-pretrained, fine-tuned\nbest 0.5000 at epoch 2"]


def test_report_table_gives_each_metric_final_and_best_with_its_epoch():
    """The pretraining table of a run evaluated at epochs 2, 4 and 6 of 7: each monitor metric's final value at
    epoch 6 and its best at epoch 4, as the metric counts best (lowest val loss, highest PSNR and kNN)."""
    pre = sparse_pretraining()
    report = "\n".join(plot_results.report_pretraining(pre, plot_results.pretrain_numbers(pre), {}, str))
    assert table_value(report, "best loss (epoch)") == "0.52000 (6)"
    assert table_value(report, "kNN top-1 on val, final (epoch)") == "60.00% (6)"
    assert table_value(report, "kNN top-1 on val, best (epoch)") == "60.00% (4)"
    assert table_value(report, "val masked MSE (fixed masks), final (epoch)") == "0.40000 (6)"
    assert table_value(report, "val masked MSE (fixed masks), best (epoch)") == "0.30000 (4)"
    assert table_value(report, "val PSNR of masked patches, final (epoch)") == "11.00 dB (6)"
    assert table_value(report, "val PSNR of masked patches, best (epoch)") == "12.00 dB (4)"


def test_a_summary_that_agrees_with_the_arrays_gives_no_note_and_each_stale_field_one():
    """val_acc 0.5, 0.7, 0.6: best 0.7 at epoch 2 of 3, final 0.6. A summary saying so is silent; one field
    changed at a time is named, with the arrays' value."""
    summary = {"best_val_acc": 0.7, "best_epoch": 2, "final_val_acc": 0.6, "epochs": 3}
    run = plot_results.ClassifierRun("r", "scratch", {"val_acc": np.array([0.5, 0.7, 0.6])}, summary)
    notes = []
    plot_results.check_summary(run, notes)
    assert notes == []
    for key, stale in (("best_val_acc", 0.75), ("best_epoch", 3), ("final_val_acc", 0.7), ("epochs", 2)):
        run.summary, notes = {**summary, key: stale}, []
        plot_results.check_summary(run, notes)
        assert notes == [f"r_summary.json says {key} {stale}, the .npy arrays give {summary[key]}: the numbers "
                         "come from the arrays"]


def test_the_probe_run_without_a_summary_is_reported_as_a_linear_probe():
    """The run named by --linprobe_run is a probe unless its summary says otherwise: its recipe cell and its
    accuracy line say so (a probe's recipe flags set its lr schedule only)."""
    def rows(run):
        return plot_results.report_classifiers([run], {}, str)
    probe = plot_results.ClassifierRun("lp", "linprobe", {"val_acc": np.array([0.3, 0.4])}, {"recipe": "finetune"})
    assert "| lp | MAE-pretrained, linear probe | linear probe |" in rows(probe)[4]
    assert "Linear-probe accuracy (`lp`): 40.00% best (epoch 2), 40.00% final." in rows(probe)
    probe.summary["linear_probe"] = False
    assert "| lp | MAE-pretrained, linear probe | finetune |" in rows(probe)[4]
    assert not any(line.startswith("Linear-probe accuracy") for line in rows(probe))


def test_training_time_is_the_sum_of_every_epochs_seconds_in_readable_units():
    """log.jsonl's seconds of epochs 1..E summed (records without seconds, and epochs past the losses, left out):
    40 + 50 + 60 s is 2.5 min. Without every epoch's seconds there is no row rather than a partial sum. Durations
    read in seconds under 2 minutes, minutes under 2 hours, hours beyond."""
    pre = plot_results.Pretraining("pre", np.array([0.5, 0.4, 0.3]), {}, [
        {"epoch": 1, "seconds": 40.0}, {"epoch": 2, "seconds": 50.0}, {"epoch": 2, "knn_acc": 0.3},
        {"epoch": 3, "seconds": 60.0}, {"epoch": 4, "seconds": 1000.0}])
    report = "\n".join(plot_results.report_pretraining(pre, plot_results.pretrain_numbers(pre), {}, str))
    assert table_value(report, "training time (sum of epochs, log.jsonl)") == "2.5 min"
    pre.log = pre.log[:3]  # epoch 3's record missing
    report = "\n".join(plot_results.report_pretraining(pre, plot_results.pretrain_numbers(pre), {}, str))
    assert "training time" not in report
    assert [plot_results.duration(s) for s in (119.9, 150, 5400, 7199, 7200, 9000)] == [
        "119.9 s", "2.5 min", "90.0 min", "120.0 min", "2.00 h", "2.50 h"]


@pytest.mark.parametrize("args, split, caption", [
    ({}, "", ""),
    ({"dataset": "cifar10", "val_split": 0}, "test set", "CIFAR-10; val: test set"),
    ({"dataset": "cifar10", "val_split": 5000}, "5000 held-out train images",
     "CIFAR-10; val: 5000 held-out train images"),
    ({"dataset": "cifar100", "val_split": 0}, "test set", "CIFAR-100; val: test set"),
    ({"dataset": "fake", "val_split": 0}, "synthetic val set",
     "synthetic images (--dataset fake); val: synthetic val set"),
    ({"dataset": "folder", "val_split": 0}, "val/ or test/ folder", "image folder; val: val/ or test/ folder"),
    ({"dataset": "folder", "val_split": 300}, "300 held-out train images",
     "image folder; val: 300 held-out train images"),
])
def test_captions_name_the_dataset_and_the_images_its_val_numbers_come_from(args, split, caption):
    """The val split as the run's data flags chose it: held-out train images with --val_split, else the dataset's
    own test set (CIFAR), synthetic val set (fake) or val/test folder (folder); nothing without args.json."""
    assert plot_results.val_split(args) == split
    assert plot_results.data_caption(args) == caption
    assert plot_results.data_caption(args, val=False) == caption.split(";")[0]


def test_top_confusions_never_list_an_empty_cell():
    """Asked for more than there are cells (9 of 3 x 3), no cell without images comes back."""
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 0, 0, 1, 1, 2, 0])
    run = plot_results.ClassifierRun("r", "scratch", {}, {}, preds=preds, labels=labels, classes=["a", "b", "c"])
    listed = plot_results.top_confusions(run, count=9)
    assert listed[:2] == [("c", "a", 50.0, 1), ("a", "b", 25.0, 1)] and all(c > 0 for *_, c in listed)


def test_top_confusions_list_only_confusions_that_happened():
    """Asked for 5 with two off-diagonal cells counted, two come back: 2 -> 0 (1 of 2 images, 50%), then 0 -> 1
    (1 of 4, 25%); a class's correct predictions are no confusion."""
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 0, 0, 1, 1, 2, 0])
    run = plot_results.ClassifierRun("r", "scratch", {}, {}, preds=preds, labels=labels, classes=["a", "b", "c"])
    assert plot_results.top_confusions(run) == [("c", "a", 50.0, 1), ("a", "b", 25.0, 1)]


def test_the_confusions_listed_are_the_pretrained_runs_else_the_first_runs():
    """The report lists the most frequent confusions of the pretrained fine-tune (the run of the confusion matrix)
    even when another run with predictions comes first; without one, those of the first run."""
    def run(name, role, preds):
        return plot_results.ClassifierRun(name, role, {"val_acc": np.array([0.5])}, {}, preds=np.array(preds),
                                          labels=np.array([0, 0, 1, 1]), classes=["a", "b"])
    scratch, pretrained = run("scratch", "scratch", [1, 1, 1, 1]), run("pretrained", "pretrained", [0, 0, 0, 1])
    report = plot_results.report_classifiers([scratch, pretrained], {}, str)
    at = report.index("Most frequent confusions of `pretrained` (share of the true class):")
    assert report[at + 2] == "- b -> a: 50.0% (1 images)"
    report = plot_results.report_classifiers([scratch], {}, str)
    at = report.index("Most frequent confusions of `scratch` (share of the true class):")
    assert report[at + 2] == "- a -> b: 100.0% (2 images)"


def test_printed_summary_says_each_best_and_final_at_its_epoch():
    """The lines plot_results prints: the pretraining's best and final loss, the kNN's final at the last evaluated
    epoch and best at its own, and each run's best val accuracy (earliest of equal bests) and final one."""
    run = plot_results.ClassifierRun("scratch", "scratch", {"val_acc": np.array([0.5, 0.7, 0.7, 0.6])}, {})
    assert plot_results.summary_lines(sparse_pretraining(), [run]) == [
        "pretraining (pre): 7 epochs, best loss 0.52000 at epoch 6, final 0.55000",
        "  first 5: 0.90000, 0.80000, 0.70000, 0.65000, 0.60000",
        "  last 5:  0.70000, 0.65000, 0.60000, 0.52000, 0.55000",
        "  kNN top-1: final 60.00% (epoch 6), best 60.00% (epoch 4)",
        "scratch (from scratch): best val acc 70.00% at epoch 2, final 60.00% (4 epochs)"]


def test_confusion_matrix_title_gives_the_top1_accuracy_of_its_predictions():
    """3 of 4 predictions right: 75.00%, over the 4 val images."""
    run = plot_results.ClassifierRun("pretrained", "pretrained", {}, {}, preds=np.array([0, 1, 1, 2]),
                                     labels=np.array([0, 1, 2, 2]), classes=["a", "b", "c"])
    fig = plot_results.plot_confusion(run)
    assert fig.axes[0].get_title() == ("Confusion matrix, MAE-pretrained, fine-tuned\n4 val images, last epoch, "
                                       "top-1 75.00% (row-normalised, %)")
    plot_results.plt.close(fig)


def test_without_class_names_the_classes_are_every_index_the_predictions_and_labels_use(tmp_path):
    """No summary.json: the classes are 0..the largest index among the predictions and labels, named by number."""
    np.save(tmp_path / "scratch_val_acc.npy", np.array([0.5, 0.6]))
    np.save(tmp_path / "scratch_val_preds.npy", np.array([0, 2, 1]))
    np.save(tmp_path / "scratch_val_labels.npy", np.array([0, 1, 1]))
    run = plot_results.load_classifier_run(str(tmp_path), "scratch", "scratch", [], [])
    assert run.classes == ["0", "1", "2"]
    assert plot_results.confusion_counts(run.preds, run.labels, len(run.classes)).tolist() == [
        [1, 0, 0], [0, 1, 1], [0, 0, 0]]


def test_confusion_matrix_is_normalised_per_true_class_with_named_axes(run_outputs):
    _, cls = run_outputs
    run = plot_results.load_classifier_run(str(cls), "pretrained", "pretrained", [], [])
    fig = plot_results.plot_confusion(run)
    ax = fig.axes[0]
    share = np.asarray(ax.images[0].get_array())
    counts = np.zeros((10, 10))
    for p, t in zip(run.preds, run.labels):
        counts[t, p] += 1
    present = counts.sum(axis=1) > 0
    assert share[present] == pytest.approx(100 * counts[present] / counts[present].sum(axis=1, keepdims=True))
    # Each true class is named with its number of val images.
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{name} ({int(n):,})" for name, n in
                                                            zip(run.classes, counts.sum(axis=1))]
    assert [t.get_text() for t in ax.get_xticklabels()] == run.classes
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class (images)"
    # Each cell's printed percentage is that cell's: column = predicted class, row = true class.
    cells = {(int(t.get_position()[1]), int(t.get_position()[0])): float(t.get_text()) for t in ax.texts}
    assert set(cells) == set(zip(*np.nonzero(counts)))
    assert all(value == pytest.approx(share[row, column], abs=0.5) for (row, column), value in cells.items())


def test_a_confusion_matrix_of_many_classes_says_its_ticks_are_class_indices(run_outputs):
    """Beyond 20 classes (CIFAR-100) the cells carry no numbers and the ticks no names: the axes say the ticks are
    indices, not the "(images)" counts the tick labels have up to 20 classes."""
    _, cls = run_outputs
    run = plot_results.load_classifier_run(str(cls), "pretrained", "pretrained", [], [])
    rng = np.random.default_rng(0)
    for k in (21, 22, 23, 25, 100):
        run = dataclasses.replace(run, classes=[f"class_{i}" for i in range(k)], preds=rng.integers(0, k, 1200),
                                  labels=rng.integers(0, k, 1200))
        fig = plot_results.plot_confusion(run)
        plot_results.plt.close(fig)
        ax = fig.axes[0]
        assert ax.get_xlabel() == "predicted class (index)" and ax.get_ylabel() == "true class (index)"
        assert not ax.texts and "class_0" not in [t.get_text() for t in ax.get_yticklabels()]
        assert ax.get_title().split("\n")[1].startswith("1,200 val images, last epoch, top-1 ")
        for ticks in (ax.get_xticks(), ax.get_yticks()):  # whole indices: no class 2.5
            shown = [t for t in ticks if -0.5 <= t <= k - 0.5]
            assert len(shown) >= 3 and all(float(t).is_integer() for t in shown), (k, shown)


def test_best_points_are_annotated_and_log_scale_is_an_option(run_outputs):
    """Each figure names its best point (the lowest loss, the highest accuracy) with its epoch, on the real runs'
    curves; --log_scale sets a log axis on the losses, never on an accuracy."""
    pre_dir, cls = run_outputs
    pre = plot_results.load_pretraining(str(pre_dir), [], [])
    losses = pre.losses.tolist()
    best = losses.index(min(losses))
    for log_scale in (False, True):
        fig = plot_results.plot_loss_curve(pre, log_scale)
        ax = fig.axes[0]
        assert ax.get_yscale() == ("log" if log_scale else "linear")
        assert [t.get_text() for t in ax.texts] == [f"best {losses[best]:.5f} (epoch {best + 1})"]
        # the label says so: over a narrow range the evenly spaced ticks of a log axis look linear
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel().startswith(
            "MSE on masked patches, log scale\n" if log_scale else "MSE on masked patches\n")
        assert ax.get_title().startswith("MAE pretraining on synthetic images (--dataset fake):")  # what it ran on
        monitor = plot_results.plot_monitor(pre, log_scale)
        assert monitor.axes[0].get_ylabel() == ax.get_ylabel()
        plot_results.plt.close(monitor)
    runs = [plot_results.load_classifier_run(str(cls), r, r, [], []) for r in RUNS]
    fig = plot_results.plot_run_comparison(runs, "val_acc", log_scale=True)
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "linear"]  # --log_scale is for losses only
    assert comparison_title(fig).endswith("\nsynthetic images (--dataset fake); val: synthetic val set")
    assert plot_results.plot_monitor(pre, False)._suptitle.get_text() == (
        "MAE pretraining monitor: synthetic images (--dataset fake); val: synthetic val set")
    legend = comparison_legend(fig)
    for run, text in zip(runs, legend):
        acc = run.curves["val_acc"].tolist()
        assert text.endswith(f"best {100 * max(acc):.2f}% at epoch {acc.index(max(acc)) + 1}")
    loss_fig = plot_results.plot_run_comparison(runs, "train_loss", log_scale=True)
    assert [ax.get_yscale() for ax in loss_fig.axes] == ["log", "log"]
    assert loss_fig.axes[0].get_ylabel().startswith("training loss, log scale\n")
    assert comparison_title(loss_fig).endswith("\nsynthetic images (--dataset fake)")  # training data: no val split
    # Where curves meet (equal accuracies, a short run), the broken lines lie above the solid one.
    assert {line.get_linestyle(): line.get_zorder() for ax in fig.axes for line in ax.lines
            if len(line.get_xdata()) > 1} == {"-": 2, "--": 2.5, "-.": 2.5}
    legend = comparison_legend(loss_fig)
    assert len(legend) == len(runs)
    for run, text in zip(runs, legend):
        loss = run.curves["train_loss"].tolist()
        assert text.endswith(f"best {min(loss):.4f} at epoch {loss.index(min(loss)) + 1}")


def test_the_reports_pretraining_line_and_the_loss_axis_say_what_the_run_did():
    """The report's pretraining configuration gives each flag's own value (batch 512, not the 256 of the chunks), the
    lr schedule (warmup_cosine for an args.json from before --schedule existed), and the loss axis names the targets
    of the run: per-patch normalised pixels under --norm_pix_loss, else pixels."""
    args = {"dataset": "cifar10", "total_epoch": 150, "warmup_epoch": 200, "schedule": "reference", "batch_size": 512,
            "max_device_batch_size": 256, "mask_ratio": 0.75, "device": "cuda", "embed_dim": 192, "depth": 12,
            "decoder_embed_dim": 128, "decoder_depth": 4, "patch_size": 2, "val_split": 0}
    assert plot_results.pretrain_config(plot_results.Pretraining("outputs", np.ones(150), args, [])) == (
        "--dataset cifar10, --total_epoch 150, --warmup_epoch 200, --schedule reference, --batch_size 512, "
        "--mask_ratio 0.75, --device cuda; encoder 192 x 12 blocks, decoder 128 x 4, patch 2; val numbers on the "
        "test set")
    del args["schedule"]
    assert ", --warmup_epoch 200, --schedule warmup_cosine, " in plot_results.pretrain_config(
        plot_results.Pretraining("outputs", np.ones(150), args, []))
    assert "per-patch normalised pixels" in plot_results.loss_label({"norm_pix_loss": True})
    assert "pixels scaled to [-1, 1]" in plot_results.loss_label({"norm_pix_loss": False})


def log_axis_labels(low: float, high: float) -> tuple:
    """log_y_axis on a curve from low to high -> (its major ticks' labels, its minor ticks' labels), within its
    limits, as drawn."""
    fig = plot_results.plt.figure()
    try:
        ax = fig.add_subplot()
        ax.plot([1, 2], [low, high])
        plot_results.log_y_axis(ax)
        fig.canvas.draw()
        bottom, top = ax.get_ylim()
        return tuple([formatter(value, i) for i, value in enumerate(locs) if bottom <= value <= top]
                     for locs, formatter in ((ax.yaxis.get_majorticklocs(), ax.yaxis.get_major_formatter()),
                                             (ax.yaxis.get_minorticklocs(), ax.yaxis.get_minor_formatter())))
    finally:
        plot_results.plt.close(fig)


@pytest.mark.parametrize("low, high", [(0.27, 0.33), (1.0, 2.2), (1.1, 2.3), (0.11, 0.23), (2.30, 2.31), (0.16, 0.85),
                                       (0.0402, 0.2381), (0.01, 1.0), (1e-3, 10.0)])
def test_a_log_loss_axis_labels_at_least_three_values_whatever_its_range(low, high):
    """--log_scale's axis names at least three distinct values between its limits, as plain numbers, each on a major
    tick, where the grid is drawn: across less than a factor of 3 (a short run's losses, 0.27 to 0.33), powers of
    ten and their multiples had left one label or none, so the axis could not be read; and within a decade (0.16 to
    0.85, a 150-epoch pretraining's) the labels were on minor ticks, with no horizontal grid line."""
    labels, minor_labels = log_axis_labels(low, high)
    assert not any(minor_labels), minor_labels
    assert all(labels) and len(labels) == len(set(labels)) >= 3, labels
    assert all(float(label) > 0 for label in labels), labels  # plain numbers: no 10^-2 in mathtext


@pytest.mark.parametrize("low, high, labelled", [(0.16, 0.85, {"0.15", "0.2", "0.3", "0.5", "0.8"}),
                                                 (0.01, 1.0, {"0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1"}),
                                                 (1e-3, 10.0, {"0.001", "0.01", "0.1", "1", "10"})])
def test_a_log_axis_labels_multiples_of_ten_within_a_decade_or_two(low, high, labelled):
    """Which values a log axis labels: 1, 1.5, 2, 3, 4, 5, 6 and 8 times a power of ten within about a decade (a
    150-epoch pretraining's 0.16 to 0.85, whose lowest label is then 0.15), 1, 2 and 5 times one within 2.5 decades,
    the powers alone beyond."""
    labels = set(log_axis_labels(low, high)[0])
    assert labels >= labelled and (high / low < 10 ** 2.5 or labels == labelled), labels


@pytest.mark.parametrize("knn", [[0.3, 0.6], [1.0, 1.0], [1.0, 0.9], [0.2, 1.0]])
def test_the_best_points_label_lies_inside_its_panel(run_outputs, knn):
    """The monitor's kNN label stays inside its axes, clear of the panel's title, wherever the best point is: at
    100% all along (synthetic data's usual kNN), its label went above the axes, over the title."""
    pre = plot_results.load_pretraining(str(run_outputs[0]), [], [])
    pre.evals["knn_acc"] = np.array(knn)
    fig = plot_results.plot_monitor(pre, False)
    ax = fig.axes[-1]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside, label = ax.get_window_extent(renderer), ax.texts[0].get_window_extent(renderer)
    assert ax.texts[0].get_text().startswith(f"best {100 * max(knn):.2f}%")
    assert inside.y0 <= label.y0 and label.y1 <= inside.y1, (label, inside)
    assert not label.overlaps(ax.title.get_window_extent(renderer))


@pytest.mark.parametrize("val_loss", [[0.30, 0.20], [0.20, 0.30], [0.25, 0.25]])
def test_the_monitors_loss_panel_stars_the_lowest_val_loss_inside_the_panel(run_outputs, val_loss):
    """The monitor's loss panel stars the lowest val loss (the earliest on a tie) and names it with its epoch, the
    label inside the axes, as each other panel stars its own metric; the training loss's best is loss_curve.png's."""
    pre = plot_results.load_pretraining(str(run_outputs[0]), [], [])
    pre.evals["val_loss"] = np.array(val_loss)
    fig = plot_results.plot_monitor(pre, False)
    ax = fig.axes[0]
    best = int(np.argmin(val_loss))
    assert [t.get_text() for t in ax.texts] == [f"best val {val_loss[best]:.5f} (epoch {pre.eval_epochs[best]})"]
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert [(star.get_xdata()[0], star.get_ydata()[0]) for star in stars] == [(pre.eval_epochs[best], val_loss[best])]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside, label = ax.get_window_extent(renderer), ax.texts[0].get_window_extent(renderer)
    assert inside.y0 <= label.y0 and label.y1 <= inside.y1, (label, inside)
    assert not label.overlaps(ax.title.get_window_extent(renderer))


def test_comparison_titles_name_the_runs_they_draw(run_outputs):
    """The accuracy and loss comparisons' titles say what is drawn: a report of a linear probe alone is not titled
    "from scratch vs MAE-pretrained". (The loss figure never draws a linear probe: main leaves it out.)"""
    _, cls = run_outputs
    runs = {r: plot_results.load_classifier_run(str(cls), r, r, [], []) for r in RUNS}

    def title(roles, curve):
        fig = plot_results.plot_run_comparison([runs[role] for role in roles], curve, False)
        plot_results.plt.close(fig)
        return comparison_title(fig).split("\n")[0]  # the second line names the data
    for roles, subject in ((RUNS, "from scratch vs MAE-pretrained (fine-tuned, linear probe)"),
                           (("scratch", "pretrained"), "from scratch vs MAE-pretrained"),
                           (("pretrained",), "MAE-pretrained"),
                           (("linprobe",), "MAE-pretrained (linear probe)"),
                           (("scratch", "linprobe"), "from scratch vs MAE-pretrained (linear probe)")):
        assert title(roles, "val_acc") == f"Validation accuracy: {subject}", roles
    for roles, subject in ((("scratch", "pretrained"), "from scratch vs MAE-pretrained"),
                           (("scratch",), "from scratch"), (("pretrained",), "MAE-pretrained")):
        assert title(roles, "train_loss") == f"Fine-tuning training loss: {subject}", roles

    # A probe of a random encoder (no --pretrained_model_path), named by --linprobe_run: its summary says what it is.
    summary = {**runs["linprobe"].summary, "pretrained_model_path": "", "pretrained_sha256": None}
    runs["linprobe"] = dataclasses.replace(runs["linprobe"], summary=summary)
    assert runs["linprobe"].label == "random encoder, linear probe"
    assert title(("linprobe",), "val_acc") == "Validation accuracy: random encoder (linear probe)"
    assert title(RUNS, "val_acc") == ("Validation accuracy: from scratch vs MAE-pretrained vs random encoder "
                                      "(linear probe)")
    # The probes on a panel of their own, on the fine-tunes' y axis.
    fig = plot_results.plot_run_comparison([runs[role] for role in RUNS], "val_acc", False)
    plot_results.plt.close(fig)
    assert [ax.get_title() for ax in fig.axes] == ["fine-tuned", "linear probe (frozen encoder)"]
    assert [[line.get_color() for line in ax.lines[::2]] for ax in fig.axes] == [
        [plot_results.ORANGE, plot_results.BLUE], [plot_results.PURPLE]]
    assert fig.axes[1].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])
    assert fig.axes[1].get_xlim()[1] < fig.axes[0].get_xlim()[1]  # each panel spans its own runs' epochs (2 and 3)
    fig = plot_results.plot_run_comparison([runs["linprobe"]], "val_acc", False)
    plot_results.plt.close(fig)
    assert fig.axes[0].get_legend().get_texts()[0].get_text().startswith("random encoder, linear probe\n")
    # All four: the MAE encoder's fine-tune and probe, each beside its baseline.
    runs["random_probe"] = runs["linprobe"]
    runs["linprobe"] = plot_results.load_classifier_run(str(cls), "linprobe", "linprobe", [], [])
    assert title(("scratch", "pretrained", "linprobe", "random_probe"), "val_acc") == (
        "Validation accuracy: from scratch vs MAE-pretrained (fine-tuned, linear probe) vs random encoder "
        "(linear probe)")


def test_best_recon_follows_the_lowest_loss_and_a_missing_epoch_is_named(tmp_path):
    pre = tmp_path / "outputs"
    pre.mkdir()
    np.save(pre / "losses.npy", np.array([0.5, 0.3, 0.4, 0.35]))
    for epoch, colour in ((2, (255, 0, 0)), (3, (0, 255, 0))):
        Image.new("RGB", (300, 300), colour).save(pre / f"recon_epoch_{epoch:03d}.png")
    stdout = plot("--pretrain_dir", pre, "--cls_dir", tmp_path / "none", "--report", tmp_path / "r.md")
    assert (pre / "best_recon.png").read_bytes() == (pre / "recon_epoch_002.png").read_bytes()
    assert not (pre / "last_recon.png").exists()
    missing = [line for line in stdout.splitlines() if line.startswith("missing:")]
    assert len(missing) == 1 and "recon_epoch_004.png (no last_recon.png)" in missing[0]
    assert "pretrain_monitor" in missing[0]  # no eval_*.npy in this folder
    assert "![reconstructions at the lowest-loss epoch (2)](outputs/best_recon.png)" in (tmp_path / "r.md").read_text()


def test_a_monitor_file_that_does_not_fit_its_epochs_is_left_out_and_epochs_alone_are_named_missing(tmp_path):
    """A monitor curve with more values than evaluated epochs is left out with a note, as one with fewer is (a run
    killed between two file writes), rather than drawn against the wrong epochs; eval_epochs.npy without any curve
    draws no monitor, and says so."""
    np.save(tmp_path / "losses.npy", np.array([0.5, 0.4, 0.3]))
    np.save(tmp_path / "eval_epochs.npy", np.array([1, 3]))
    missing, notes = [], []
    pre = plot_results.load_pretraining(str(tmp_path), missing, notes)
    assert pre.evals == {} and notes == []
    assert missing == [f"{tmp_path}/{{eval_epochs,knn_acc,val_loss,val_psnr}}.npy (no pretrain_monitor.png)"]
    np.save(tmp_path / "knn_acc.npy", np.array([0.2, 0.3, 0.4]))
    np.save(tmp_path / "val_psnr.npy", np.array([10.0, 12.0]))
    missing, notes = [], []
    pre = plot_results.load_pretraining(str(tmp_path), missing, notes)
    assert list(pre.evals) == ["val_psnr"] and missing == []
    assert notes == [f"{tmp_path}/knn_acc.npy has 3 values for 2 evaluated epochs: left out"]


def test_a_pretrained_run_without_predictions_or_grid_is_named_and_a_run_without_a_curve_draws_no_figure(tmp_path):
    """The pretrained run gives the prediction grid and the confusion matrix: without their files, both are named
    missing (the scratch run's are not needed, so not named). A run with val accuracy alone draws the accuracy
    comparison, and no training-loss figure with nothing on it."""
    pre, cls = tmp_path / "outputs", tmp_path / "cls_outputs"
    cls.mkdir()
    for run in ("scratch", "pretrained"):
        np.save(cls / f"{run}_val_acc.npy", np.array([0.3, 0.4]))
    stdout = plot("--pretrain_dir", pre, "--cls_dir", cls, "--linprobe_run", "", "--report", tmp_path / "r.md")
    missing = [line for line in stdout.splitlines() if line.startswith("missing:")][0]
    assert f"{cls}/pretrained_preds_grid.png" in missing
    assert f"{cls}/pretrained_val_{{preds,labels}}.npy (no confusion matrix)" in missing
    assert "scratch_preds_grid" not in missing and "scratch_val_{preds" not in missing
    assert (cls / "cls_val_acc_compare.png").is_file() and not (cls / "cls_train_loss_compare.png").exists()
    assert "cls_train_loss_compare" not in (tmp_path / "r.md").read_text()


def test_evaluations_past_the_runs_last_epoch_are_an_earlier_runs_and_left_out_with_a_note(run_outputs, tmp_path):
    """Monitor arrays whose epochs go past losses.npy's (an earlier, longer run's in the same folder; or a damaged
    file, epoch 1e20) are not drawn as this run's: a note, no pretrain_monitor.png, no kNN row."""
    pre, cls = copy_outputs(run_outputs, tmp_path)
    np.save(pre / "eval_epochs.npy", np.array([1.0, 1e20]))
    plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "r.md")
    report = (tmp_path / "r.md").read_text()
    assert f"{pre}/eval_epochs.npy holds epochs up to 1e+20, past the 2 of losses.npy" in report
    assert not (pre / "pretrain_monitor.png").exists() and "kNN" not in report


def test_predictions_of_another_integer_type_than_the_labels_and_a_time_no_float_holds_are_reported(run_outputs,
                                                                                                    tmp_path):
    """uint64 predictions beside int64 labels (numpy mixes them as float64, which bincount refused) give the same
    confusion matrix; an epoch's time of 10**400 seconds in log.jsonl (float() overflowed) leaves the training
    time out, as any time that is no number does."""
    pre, cls = copy_outputs(run_outputs, tmp_path)
    plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "before.md")
    preds = cls / "pretrained_val_preds.npy"
    np.save(preds, np.load(preds).astype(np.uint64))
    log = [json.loads(line) for line in (pre / "log.jsonl").read_text().splitlines()]
    log[0]["seconds"] = 10 ** 400
    (pre / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "after.md")
    before, after = (tmp_path / "before.md").read_text(), (tmp_path / "after.md").read_text()
    assert "training time" in before and "training time" not in after
    confusions = [line for line in before.splitlines() if " -> " in line]
    assert confusions and confusions == [line for line in after.splitlines() if " -> " in line]


def test_last_recon_is_the_last_trained_epochs_not_the_last_evaluated_ones(tmp_path):
    """A run of 3 epochs evaluated at epoch 2 only: last_recon.png is epoch 3's reconstructions."""
    pre = tmp_path / "outputs"
    pre.mkdir()
    np.save(pre / "losses.npy", np.array([0.5, 0.3, 0.4]))
    np.save(pre / "eval_epochs.npy", np.array([2]))
    np.save(pre / "knn_acc.npy", np.array([0.5]))
    for epoch, colour in ((2, (255, 0, 0)), (3, (0, 255, 0))):
        Image.new("RGB", (300, 300), colour).save(pre / f"recon_epoch_{epoch:03d}.png")
    plot("--pretrain_dir", pre, "--cls_dir", tmp_path / "none", "--report", tmp_path / "r.md")
    assert (pre / "last_recon.png").read_bytes() == (pre / "recon_epoch_003.png").read_bytes()
    assert (pre / "best_recon.png").read_bytes() == (pre / "recon_epoch_002.png").read_bytes()


def test_a_figure_these_inputs_no_longer_draw_is_removed_and_named(run_outputs, tmp_path):
    """A second call after the pretraining was rerun without evaluations and with the pretrained run's predictions
    gone: the earlier call's monitor and confusion matrix would sit beside the new report as its own, so they are
    removed and named; every figure the second call draws is there. A folder the call draws nothing into (no
    losses.npy there) keeps its files."""
    pre, cls = copy_outputs(run_outputs, tmp_path)
    plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "r.md")
    assert all((pre / f).is_file() for f in PRETRAIN_FIGURES) and all((cls / f).is_file() for f in CLS_FIGURES)
    for name in ("eval_epochs", "knn_acc", "val_loss", "val_psnr"):
        (pre / f"{name}.npy").unlink()
    (cls / "pretrained_val_preds.npy").unlink()
    stdout = plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "r.md")
    assert not (pre / "pretrain_monitor.png").exists() and not (cls / "confusion_matrix.png").exists()
    removed = [line for line in stdout.splitlines() if line.startswith("removed")]
    assert removed == ["removed an earlier call's figures, which these inputs no longer draw: "
                       f"{pre / 'pretrain_monitor.png'}, {cls / 'confusion_matrix.png'}"]
    assert {f for f in PRETRAIN_FIGURES + CLS_FIGURES if (pre / f).is_file() or (cls / f).is_file()} == \
        set(PRETRAIN_FIGURES + CLS_FIGURES) - {"pretrain_monitor.png", "confusion_matrix.png"}
    embedded = [line for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith("![")]
    assert embedded and not [line for line in embedded if "pretrain_monitor" in line or "confusion_matrix" in line]

    (pre / "losses.npy").unlink()  # now nothing is drawn into --pretrain_dir: its figures stay as they were
    stdout = plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "r.md")
    assert all((pre / f).is_file() for f in ("loss_curve.png", "best_recon.png", "last_recon.png"))
    assert not any(line.startswith("removed") for line in stdout.splitlines())


def test_only_pretraining_plots_it_and_names_the_missing_runs(run_outputs, tmp_path):
    pre, _ = copy_outputs(run_outputs, tmp_path)
    shutil.rmtree(tmp_path / "cls_outputs")
    stdout = plot("--pretrain_dir", pre, "--cls_dir", tmp_path / "cls_outputs", "--report", tmp_path / "r.md")
    assert all((pre / f).is_file() for f in PRETRAIN_FIGURES)
    assert not (tmp_path / "cls_outputs").exists()
    missing = [line for line in stdout.splitlines() if "missing" in line]
    assert len(missing) == 1 and missing[0].startswith("missing:")
    assert all(f"no '{run}' run" in missing[0] for run in RUNS)
    assert "## Classification" not in (tmp_path / "r.md").read_text()


def test_only_one_classifier_run_plots_it_and_names_what_is_missing(run_outputs, tmp_path):
    _, cls = copy_outputs(run_outputs, tmp_path)
    for path in cls.iterdir():
        if not path.name.startswith("scratch_"):
            path.unlink()
    stdout = plot("--pretrain_dir", tmp_path / "nowhere", "--cls_dir", cls, "--report", tmp_path / "r.md")
    assert (cls / "cls_train_loss_compare.png").is_file() and (cls / "cls_val_acc_compare.png").is_file()
    assert not (cls / "confusion_matrix.png").exists()  # drawn for the pretrained run only
    missing = [line for line in stdout.splitlines() if "missing" in line]
    assert len(missing) == 1 and missing[0].startswith("missing:")
    assert "losses.npy" in missing[0] and "no 'pretrained' run" in missing[0] and "no 'linprobe' run" in missing[0]
    report = (tmp_path / "r.md").read_text()
    assert "| scratch |" in report and "## MAE pretraining" not in report


def test_run_names_are_flags(run_outputs, tmp_path, monkeypatch):
    """Runs are read by the names the flags give; the comparisons' legends name a run whose name is not its role's
    (two fine-tunes of different lengths look alike otherwise), and only such a run."""
    _, cls = copy_outputs(run_outputs, tmp_path)
    for path in cls.glob("pretrained_*"):
        path.rename(cls / path.name.replace("pretrained_", "ft_long_"))
    legends, real = {}, plot_results.plot_run_comparison

    def comparison(runs, curve, log_scale):
        fig = real(runs, curve, log_scale)
        legends[curve] = [t.get_text().split("\n")[0] for t in fig.axes[0].get_legend().get_texts()]
        return fig
    monkeypatch.setattr(plot_results, "plot_run_comparison", comparison)
    stdout = plot("--pretrain_dir", tmp_path / "outputs", "--cls_dir", cls, "--pretrained_run", "ft_long",
                  "--linprobe_run", "", "--report", tmp_path / "r.md")
    assert (cls / "confusion_matrix.png").is_file()
    assert "| ft_long |" in (tmp_path / "r.md").read_text() and "| linprobe |" not in (tmp_path / "r.md").read_text()
    assert "missing" not in stdout
    assert legends == {curve: ["from scratch", "MAE-pretrained, fine-tuned (ft_long)"]
                       for curve in ("train_loss", "val_acc")}


def test_a_stale_summary_is_reported_and_the_arrays_win(run_outputs, tmp_path):
    _, cls = copy_outputs(run_outputs, tmp_path)
    summary = json.load(open(cls / "scratch_summary.json"))
    summary["best_val_acc"] = 0.999
    json.dump(summary, open(cls / "scratch_summary.json", "w"))
    stdout = plot("--pretrain_dir", tmp_path / "outputs", "--cls_dir", cls, "--report", tmp_path / "r.md")
    notes = [line for line in stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "scratch_summary.json says best_val_acc 0.999" in notes[0]
    assert "99.90%" not in (tmp_path / "r.md").read_text()


def test_an_inf_in_a_curve_is_a_gap_and_a_time_that_is_no_number_leaves_the_time_out(run_outputs, tmp_path):
    """An inf in a monitor curve (a perfect reconstruction's PSNR; or a hand-edited file) is drawn as a gap, as a nan
    is, and is not the best value; a log record whose seconds are not a number leaves the training-time row out."""
    pre, cls = copy_outputs(run_outputs, tmp_path)
    psnr = np.load(pre / "val_psnr.npy")
    np.save(pre / "val_psnr.npy", np.array([psnr[0], np.inf]))
    records = [json.loads(line) for line in open(pre / "log.jsonl")]
    records[0]["seconds"] = None
    (pre / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "r.md")
    report = (tmp_path / "r.md").read_text()
    epochs = [int(e) for e in np.load(pre / "eval_epochs.npy")]
    assert table_value(report, "val PSNR of masked patches, best (epoch)") == f"{psnr[0]:.2f} dB ({epochs[0]})"
    assert table_value(report, "val PSNR of masked patches, final (epoch)") == f"n/a ({epochs[1]})"
    assert (pre / "pretrain_monitor.png").is_file() and "training time" not in report


def test_a_curves_infinities_of_either_sign_are_gaps_and_a_curve_of_no_finite_value_or_another_shape_is_refused(
        tmp_path, capsys):
    """load_vector: +inf and -inf become nan (gaps in the figures); an array with no finite value, not 1-D, of
    complex numbers, or with a value no axis can span (matplotlib's limits overflowed on +-1e308) is refused in
    one line with exit status 2, naming the flag and the file."""
    path = tmp_path / "curve.npy"
    np.save(path, np.array([1.0, -np.inf, np.inf, 2.0]))
    np.testing.assert_array_equal(plot_results.load_vector(str(path), "--cls_dir"), [1.0, np.nan, np.nan, 2.0])
    np.save(path, np.array([1e300, -1e300]))
    np.testing.assert_array_equal(plot_results.load_vector(str(path), "--cls_dir"), [1e300, -1e300])
    np.save(path, np.array([0.5, 0.25], dtype=np.float32))  # another program's float32: read without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(plot_results.load_vector(str(path), "--cls_dir"), [0.5, 0.25])
    not_1d = "should hold a non-empty 1-D array of real numbers, found"
    for values, expected in ((np.array([np.inf, -np.inf, np.nan]), "holds no finite value (all 3 are nan or inf)"),
                             (np.zeros((2, 3)), f"{not_1d} float64 (2, 3)"),
                             (np.array([1 + 1j]), f"{not_1d} complex128 (1,)"),
                             (np.array([0.5, -1e308, np.nan]), "holds -1e+308, beyond the +-1e+300 a figure can draw")):
        np.save(path, values)
        with pytest.raises(SystemExit) as exc:
            plot_results.load_vector(str(path), "--cls_dir")
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--cls_dir: {str(path)!r} {expected}" in err, err


def test_no_input_at_all_is_one_line_with_status_2_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot_results.py")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("plot_results.py: error: nothing to plot: no outputs/losses.npy")
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, expected", [
    ("losses", "--pretrain_dir: '{pre}/losses.npy' is not a .npy file (it does not start with the .npy header)"),
    ("nan_accuracy", "scratch_val_acc.npy' holds no finite value (all 3 are nan or inf)"),
    ("preds", "--cls_dir"),
    ("negative_preds", "pretrained_val_preds.npy' should hold class indices in [0, 10), found int64 values in [-1, "),
    ("short_preds", "pretrained_val_preds.npy has 31 predictions for 32 labels in"),
    ("dpi", "--dpi must be in [72, 600], got 10"),
    ("dpi_601", "--dpi must be in [72, 600], got 601"),
    ("report", "--report"),
    ("report_replaces_input", "--report must name a .md file"),
    ("read_only_cls_dir", "--cls_dir: cannot write in"),
    # refusals os.access does not foresee: a file system that makes no files in the folder (an ACL, a kernel file
    # system), and /proc, where root passes os.access (another user is refused there by os.access first)
    ("unwritable_cls_dir", "--cls_dir: cannot write in folder"),
    ("report_in_proc", "--report: cannot write in"),
    ("names", "--scratch_run, --pretrained_run, --linprobe_run and --random_probe_run must differ"),
    ("summary_type", "pretrained_summary.json' has classes = 5, which should be a list of class names"),
    ("summary_bool", "pretrained_summary.json' has best_epoch = true, which should be an integer"),
    ("args_type", "args.json' has knn_k = \"ten\", which should be an integer"),
    ("args_bool", "args.json' has knn_k = true, which should be an integer"),  # JSON's true is not the integer 1
    ("dir_is_a_file", "--pretrain_dir '{pre}/losses.npy' is a file, not a folder"),
    ("cls_dir_is_a_file", "--cls_dir '{cls}/scratch_val_acc.npy' is a file, not a folder"),
    ("epoch_gap", "eval_epochs.npy' should hold epoch numbers (>= 1), found [1.0, nan]"),
    ("epoch_zero", "eval_epochs.npy' should hold epoch numbers (>= 1), found [0, 1]"),
    # without the summary's class names, the classes are the indices used, up to 1000: the confusion counts of
    # a label 100000 took 75 GiB
    ("unnamed_classes", "pretrained_val_labels.npy' should hold class indices in [0, 1000) (no class names in "
                        "{cls}/pretrained_summary.json), found int64 values in [0, 100000]"),
    # a summary naming more classes than a confusion matrix is drawn for: 100,000 took 75 GiB, after 6 figures
    ("many_classes", "pretrained_summary.json names 100000 classes, more than the 1000 a confusion matrix is drawn "
                     "for"),
    # an int no float can hold: float() raised OverflowError
    ("huge_json_number", "pretrained_summary.json' has best_val_acc = 1000000000000"),
    # a log axis left a loss <= 0 out, with a warning at most
    ("log_scale_zero", "--log_scale: '{cls}/scratch_train_loss.npy' (--cls_dir) holds a loss of 0, which a log axis "
                       "cannot show"),
    ("log_scale_val_loss", "--log_scale: '{pre}/val_loss.npy' (--pretrain_dir) holds a loss of -0.5, which a log "
                           "axis cannot show"),
    # a folder under a figure's name: found when that figure was saved, after the figures before it
    ("figure_is_a_folder", "--pretrain_dir: '{pre}/last_recon.png' is a folder: this script writes a file of that "
                           "name there"),
    ("cls_figure_is_a_folder", "--cls_dir: '{cls}/confusion_matrix.png' is a folder: this script writes a file of "
                               "that name there"),
])
def test_bad_input_is_one_line_and_nothing_is_written(run_outputs, tmp_path, capsys, monkeypatch, damage, expected):
    pre, cls = copy_outputs(run_outputs, tmp_path)
    extra = []
    if damage == "losses":
        (pre / "losses.npy").write_bytes(b"not a numpy file")
    elif damage == "nan_accuracy":
        np.save(cls / "scratch_val_acc.npy", np.full(3, np.nan))
    elif damage == "preds":
        np.save(cls / "pretrained_val_preds.npy", np.full(32, 10, dtype=np.int64))  # class 10 of 10
    elif damage == "negative_preds":  # bincount would fail on it, deep inside the confusion matrix
        preds = np.load(cls / "pretrained_val_preds.npy")
        preds[0] = -1
        np.save(cls / "pretrained_val_preds.npy", preds)
    elif damage == "short_preds":
        np.save(cls / "pretrained_val_preds.npy", np.load(cls / "pretrained_val_preds.npy")[:-1])
    elif damage in ("dpi", "dpi_601"):
        extra = ["--dpi", "10" if damage == "dpi" else "601"]
    elif damage == "report":
        extra = ["--report", tmp_path / "no" / "such" / "folder" / "r.md"]
    elif damage == "read_only_cls_dir":
        # Root writes through permissions: the folder is made read-only the way the check sees it.
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(cls) and
                            real_access(path, mode))
    elif damage == "unwritable_cls_dir":
        real_temporary_file = tempfile.NamedTemporaryFile

        def temporary_file(*args, dir=None, **kwargs):
            if dir is not None and os.path.abspath(dir) == str(cls):
                raise PermissionError(1, "Operation not permitted", dir)
            return real_temporary_file(*args, dir=dir, **kwargs)
        monkeypatch.setattr(tempfile, "NamedTemporaryFile", temporary_file)
    elif damage == "report_in_proc":
        if not os.path.isdir("/proc"):
            pytest.skip("no /proc on this system")
        extra = ["--report", "/proc/r.md"]
    elif damage in ("summary_type", "summary_bool", "args_type", "args_bool"):  # hand-edited files
        path = cls / "pretrained_summary.json" if damage.startswith("summary") else pre / "args.json"
        key, value = {"summary_type": ("classes", 5), "summary_bool": ("best_epoch", True),
                      "args_type": ("knn_k", "ten"), "args_bool": ("knn_k", True)}[damage]
        obj = json.loads(path.read_text())
        obj[key] = value
        path.write_text(json.dumps(obj))
    elif damage == "dir_is_a_file":  # a slip: a file of the folder for the folder
        extra = ["--pretrain_dir", pre / "losses.npy"]
    elif damage == "cls_dir_is_a_file":
        extra = ["--cls_dir", cls / "scratch_val_acc.npy"]
    elif damage == "epoch_gap":
        np.save(pre / "eval_epochs.npy", np.array([1.0, np.inf]))
    elif damage == "epoch_zero":
        np.save(pre / "eval_epochs.npy", np.array([0, 1]))
    elif damage in ("figure_is_a_folder", "cls_figure_is_a_folder"):
        figure = pre / "last_recon.png" if damage == "figure_is_a_folder" else cls / "confusion_matrix.png"
        figure.unlink(missing_ok=True)
        figure.mkdir()
    elif damage in ("many_classes", "huge_json_number"):
        summary = json.loads((cls / "pretrained_summary.json").read_text())
        if damage == "many_classes":
            summary["classes"] = [f"c{i}" for i in range(100000)]
        else:
            summary["best_val_acc"] = 10 ** 400
        (cls / "pretrained_summary.json").write_text(json.dumps(summary))
    elif damage == "unnamed_classes":
        (cls / "pretrained_summary.json").unlink()
        labels = np.load(cls / "pretrained_val_labels.npy")
        labels[0] = 100000
        np.save(cls / "pretrained_val_labels.npy", labels)
    elif damage == "log_scale_zero":
        np.save(cls / "scratch_train_loss.npy", np.array([0.0, 0.5, 0.25]))
        extra = ["--log_scale"]
    elif damage == "log_scale_val_loss":
        np.save(pre / "val_loss.npy", np.array([0.5, -0.5]))
        extra = ["--log_scale"]
    elif damage == "report_replaces_input":
        extra = ["--report", pre / "args.json"]
    else:
        extra = ["--linprobe_run", "scratch"]
    # Every file and folder as it was, each file unwritten. A folder's own time may move: the check that a folder
    # takes files makes one there and deletes it (utils.check_output_folder).
    def state():
        return {p: p.stat().st_mtime_ns if p.is_file() else "folder" for p in tmp_path.rglob("*")}
    before = state()
    with pytest.raises(SystemExit) as exc:
        plot("--pretrain_dir", pre, "--cls_dir", cls, "--report", tmp_path / "r.md", *extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.format(pre=pre, cls=cls) in err, err
    assert state() == before
