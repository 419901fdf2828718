"""The report's figures and numbers, rebuilt from the files mae_pretrain.py and train_classifier.py wrote.

After the runs (the defaults are the scripts' defaults; CPU only, no display, a few seconds):
    python plot_results.py
writes outputs/{loss_curve, best_recon, last_recon, pretrain_monitor}.png,
cls_outputs/{cls_train_loss_compare, cls_val_acc_compare, confusion_matrix}.png and results.md, and prints the
numbers. It plots whatever exists and names what is missing in one line.
On other folders, e.g. the tiny CPU run of mae_pretrain.py's docstring:
    python plot_results.py --pretrain_dir /tmp/mae_out --cls_dir /tmp/cls_out --report /tmp/results.md
"""
import json
import os
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.legend_handler import HandlerTuple  # noqa: E402
from matplotlib.ticker import (FuncFormatter, Locator, LogLocator, MaxNLocator, MultipleLocator,  # noqa: E402
                               NullFormatter)

import utils  # noqa: E402
from utils import BLUE, GREEN, ORANGE, PURPLE, VERMILLION  # noqa: E402  (Okabe-Ito)

# Each role's colour comes with a line style, so that the figures also survive a greyscale print.
ROLES = {  # classifier run role -> (legend label, colour, line style)
    "scratch": ("from scratch", ORANGE, "--"),
    "pretrained": ("MAE-pretrained, fine-tuned", BLUE, "-"),
    "linprobe": ("MAE-pretrained, linear probe", GREEN, "-."),
    "random_probe": ("random encoder, linear probe", PURPLE, ":"),  # --linear_probe without --pretrained_model_path
}
# The README's run name for the random-encoder probe, which --random_probe_run reads by default when it is there:
# the whole experiment's five commands do not make it, and a report without it names nothing missing.
RANDOM_PROBE_NAME = "linprobe_random"
# Each role's run name by default (--scratch_run ... --random_probe_run). A run under its flag's default name is named
# in the legends by its label alone; another name is added to it.
DEFAULT_NAMES = {"scratch": "scratch", "pretrained": "pretrained", "linprobe": "linprobe",
                 "random_probe": RANDOM_PROBE_NAME}
STYLE = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5, "xtick.labelsize": 9,
    "ytick.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.6, "lines.linewidth": 1.6, "legend.frameon": False,
    "figure.constrained_layout.use": True, "savefig.bbox": "tight", "savefig.pad_inches": 0.04,
}
# The names of the scripts' outputs, as the files give them: plot_results reads files and imports neither
# training script (tests pin these to mae_pretrain.EVAL_METRICS and train_classifier.CURVES).
MONITOR_FILES = ("eval_epochs", "knn_acc", "val_loss", "val_psnr")
LOWER_IS_BETTER = ("val_loss",)  # of the monitor's metrics; the others are best at their highest
# The monitor figure's panels after the loss (which also draws val_loss): metric -> (scale, colour, y label, title,
# unit). Every other metric has one; a test fails for a metric added without its panel.
MONITOR_PANELS = {
    "val_psnr": (1.0, VERMILLION, "PSNR of masked patches (dB)", "val reconstruction", " dB"),
    "knn_acc": (100.0, PURPLE, "top-1 accuracy (%)", "weighted kNN on val", "%"),
}
RUN_CURVES = ("train_loss", "train_acc", "val_loss", "val_acc")
# The figures drawn beside the runs' files, in --pretrain_dir and in --cls_dir.
PRETRAIN_FIGURES = ("loss_curve.png", "pretrain_monitor.png", "best_recon.png", "last_recon.png")
CLS_FIGURES = ("cls_train_loss_compare.png", "cls_val_acc_compare.png", "confusion_matrix.png")


def get_args_parser():
    parser = utils.ArgumentParser(description="Rebuild the report's figures and results.md from the run outputs")
    # Inputs (the scripts' --output_dir defaults) and run names (train_classifier.py's --run_name values)
    parser.add_argument("--pretrain_dir", default="outputs",
                        help="mae_pretrain.py --output_dir: losses.npy, log.jsonl, args.json, recon_epoch_NNN.png")
    parser.add_argument("--cls_dir", default="cls_outputs",
                        help="train_classifier.py output folder: <run>_*.npy, <run>_summary.json, ...")
    parser.add_argument("--scratch_run", default=DEFAULT_NAMES["scratch"],
                        help="run name of the classifier trained from scratch ('' to leave it out)")
    parser.add_argument("--pretrained_run", default=DEFAULT_NAMES["pretrained"],
                        help="run name of the classifier fine-tuned from the MAE encoder ('' to leave it out); "
                             "its predictions give the confusion matrix")
    parser.add_argument("--linprobe_run", default=DEFAULT_NAMES["linprobe"],
                        help="run name of the linear probe on the frozen MAE encoder ('' to leave it out)")
    parser.add_argument("--random_probe_run", default=None,
                        help="run name of the linear probe on a random encoder, the probe's baseline (default: "
                             f"{RANDOM_PROBE_NAME}, the README's, read when --cls_dir holds it; '' leaves it out)")
    # Outputs: figures go next to their inputs, the report wherever asked
    parser.add_argument("--report", default="results.md",
                        help="markdown report with the numbers and the figures (embedded by relative path)")
    parser.add_argument("--log_scale", action="store_true", help="logarithmic y axis for the loss curves")
    parser.add_argument("--dpi", type=int, default=200, help="resolution of the figures, in [72, 600] (200 for print)")
    return parser


# ----------------------------------------------------------------------------------------------------------
# Reading the runs: everything is read and checked before anything is written

@dataclass
class Pretraining:
    folder: str
    losses: np.ndarray  # (E,) mean train loss of epochs 1..E
    args: dict  # args.json, {} when absent
    log: list  # log.jsonl records
    eval_epochs: np.ndarray = None  # (K,) 1-based epochs of the encoder evaluations
    evals: dict = field(default_factory=dict)  # knn_acc / val_loss / val_psnr -> (K,)

    @property
    def best_epoch(self) -> int:
        return int(np.nanargmin(self.losses)) + 1


@dataclass
class ClassifierRun:
    name: str
    role: str  # a key of ROLES: which flag named it
    curves: dict  # train_loss / train_acc / val_loss / val_acc -> (E,), only those that exist
    summary: dict  # <run>_summary.json, {} when absent
    args: dict = field(default_factory=dict)  # <run>_args.json, {} when absent
    preds: np.ndarray = None  # (N,) int, last epoch, every val image
    labels: np.ndarray = None
    classes: list = None
    preds_grid: str = None  # path of <run>_preds_grid.png when it exists

    @property
    def linear_probe(self) -> bool:
        return bool(self.summary.get("linear_probe", self.role in ("linprobe", "random_probe")))

    @property
    def encoder_size(self) -> tuple:
        """(patch size, width, depth, heads) of the model the run built, from its args.json; Nones without one."""
        return tuple(self.args.get(name) for name in ENCODER_SIZE_FLAGS)

    @property
    def label(self) -> str:
        """What the run is, from its summary: a linear probe named by --linprobe_run may have probed a random encoder
        (the probe's baseline), and one named by --random_probe_run the MAE encoder. Without a summary, what its role
        says."""
        if "pretrained_model_path" not in self.summary:
            return ROLES[self.role][0]
        pretrained = bool(self.summary["pretrained_model_path"])
        if self.linear_probe:
            return ROLES["linprobe" if pretrained else "random_probe"][0]
        return ROLES["pretrained" if pretrained else "scratch"][0]


MAX_MAGNITUDE = 1e300
# Classes a confusion matrix is drawn for, at most: ImageNet's count. It takes n**2 counts (7.2 GB of int64 at
# 30,000). Without the class names of a run's summary, its classes are the indices its predictions and labels use.
MAX_CLASSES = 1000


def load_vector(path: str, flag: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            # np.load takes anything without the .npy magic for a pickle and says so, which misleads for text.
            if f.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                utils.die(f"{flag}: {path!r} is not a .npy file (it does not start with the .npy header)")
        values = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated, pickled objects, unreadable
        utils.die(f"{flag}: {path!r} is not a readable .npy file ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
    real = np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)  # not complex
    if values.ndim != 1 or len(values) == 0 or not real:
        utils.die(f"{flag}: {path!r} should hold a non-empty 1-D array of real numbers, found {values.dtype} "
                  f"{values.shape}")
    finite = values[np.isfinite(values)]
    if not len(finite):  # a nan here and there is drawn as a gap; with nothing else, nothing to draw
        utils.die(f"{flag}: {path!r} holds no finite value (all {len(values)} are nan or inf)")
    # No loss, accuracy or PSNR comes near; an axis's span and margins, or a percentage, overflow at about 1e308.
    if float(np.abs(finite).max()) > MAX_MAGNITUDE:  # float: compared in float32, 1e300 overflows with a warning
        utils.die(f"{flag}: {path!r} holds {finite[np.abs(finite).argmax()]:g}, beyond the +-{MAX_MAGNITUDE:g} a "
                  "figure can draw")
    # An inf too (a damaged or hand-edited file): matplotlib cannot scale an axis to it, nor a best point be it.
    return np.where(np.isinf(values), np.nan, values) if np.issubdtype(values.dtype, np.floating) else values


# The fields of the scripts' JSON files that this script reads, and what each must be. A hand-edited file with
# another type stops here with one line, not with a traceback from deep inside a figure.
NUMBER, INTEGER, TEXT, FLAG = "a number", "an integer", "a string", "true or false"
ARGS_FIELDS = {"norm_pix_loss": FLAG, "knn_k": INTEGER, "val_split": INTEGER, "dataset": TEXT, "total_epoch": INTEGER}
ENCODER_SIZE_FLAGS = ("patch_size", "embed_dim", "depth", "num_heads")  # a classifier's model, in its args.json
SUMMARY_FIELDS = {"classes": "a list of class names", "linear_probe": FLAG, "recipe": TEXT,
                  "best_val_acc": NUMBER, "final_val_acc": NUMBER, "best_epoch": INTEGER, "epochs": INTEGER,
                  "total_epoch": INTEGER,
                  "pretrained_model_path": TEXT, "pretrained_sha256": TEXT}


def is_kind(value, kind: str) -> bool:
    if kind == FLAG:
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON's true is not 1 here
        return False
    if kind in (NUMBER, INTEGER):  # one a float can hold: the report computes with it
        return utils.is_number(value) and (kind == NUMBER or isinstance(value, int))
    if kind == TEXT:
        return isinstance(value, str)
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)


def load_json(path: str, flag: str, fields: dict) -> dict:
    """The JSON object at path ({} when there is none), its `fields` checked: {name: kind}."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        utils.die(f"{flag}: {path!r} is not readable JSON ({type(e).__name__}: {e})")
    if not isinstance(obj, dict):
        utils.die(f"{flag}: {path!r} should hold a JSON object, found a {type(obj).__name__}")
    for name, kind in fields.items():
        if name in obj and obj[name] is not None and not is_kind(obj[name], kind):
            utils.die(f"{flag}: {path!r} has {name} = {json.dumps(obj[name])[:40]}, which should be {kind}")
    return obj


def load_pretraining(folder: str, missing: list, notes: list):
    losses_path = os.path.join(folder, "losses.npy")
    if not os.path.isfile(losses_path):
        missing.append(f"{losses_path} (no pretraining figures)")
        return None
    pre = Pretraining(folder, load_vector(losses_path, "--pretrain_dir").astype(np.float64),
                      load_json(os.path.join(folder, "args.json"), "--pretrain_dir", ARGS_FIELDS),
                      utils.read_jsonl(os.path.join(folder, "log.jsonl"), "--pretrain_dir"))
    present = [n for n in MONITOR_FILES if os.path.isfile(os.path.join(folder, f"{n}.npy"))]
    if "eval_epochs" not in present or len(present) == 1:
        missing.append(f"{folder}/{{{','.join(MONITOR_FILES)}}}.npy (no pretrain_monitor.png)")
        return pre
    epochs_path = os.path.join(folder, "eval_epochs.npy")
    epochs = load_vector(epochs_path, "--pretrain_dir")
    if not (np.isfinite(epochs).all() and (epochs >= 1).all()):  # the x of every other curve: no gaps here
        utils.die(f"--pretrain_dir: {epochs_path!r} should hold epoch numbers (>= 1), found {epochs.tolist()[:8]}")
    if epochs.max() > len(pre.losses):  # an earlier, longer run's, left by a version that did not remove them
        notes.append(f"{epochs_path} holds epochs up to {epochs.max():g}, past the {len(pre.losses)} of losses.npy "
                     "(an earlier run's evaluations?): no pretrain_monitor.png")
        return pre
    pre.eval_epochs = np.rint(epochs).astype(np.int64)
    for name in present[1:]:
        values = load_vector(os.path.join(folder, f"{name}.npy"), "--pretrain_dir").astype(np.float64)
        if len(values) != len(pre.eval_epochs):  # a run killed between two file writes
            notes.append(f"{folder}/{name}.npy has {len(values)} values for {len(pre.eval_epochs)} evaluated "
                         "epochs: left out")
            continue
        pre.evals[name] = values
    return pre


def run_curve_files(folder: str, name: str) -> list:
    """The curves of the classifier run `name` in folder that have their .npy file: none, no such run."""
    return [c for c in RUN_CURVES if os.path.isfile(os.path.join(folder, f"{name}_{c}.npy"))]


def load_classifier_run(folder: str, name: str, role: str, missing: list, notes: list):
    prefix = os.path.join(folder, f"{name}_")
    curves = {c: load_vector(f"{prefix}{c}.npy", "--cls_dir").astype(np.float64) for c in run_curve_files(folder, name)}
    if not curves:
        missing.append(f"{prefix}*.npy (no '{name}' run)")
        return None
    absent = [f"{name}_{c}.npy" for c in RUN_CURVES if c not in curves]
    if absent:
        missing.append(f"{folder}/{{{','.join(absent)}}}")
    run = ClassifierRun(name, role, curves, load_json(f"{prefix}summary.json", "--cls_dir", SUMMARY_FIELDS),
                        load_json(f"{prefix}args.json", "--cls_dir", ARGS_FIELDS))
    run.classes = run.summary.get("classes")
    if os.path.isfile(f"{prefix}preds_grid.png"):
        run.preds_grid = f"{prefix}preds_grid.png"
    elif role == "pretrained":
        missing.append(f"{prefix}preds_grid.png")
    if os.path.isfile(f"{prefix}val_preds.npy") and os.path.isfile(f"{prefix}val_labels.npy"):
        run.preds = load_vector(f"{prefix}val_preds.npy", "--cls_dir")
        run.labels = load_vector(f"{prefix}val_labels.npy", "--cls_dir")
        if len(run.preds) != len(run.labels):
            utils.die(f"--cls_dir: {prefix}val_preds.npy has {len(run.preds)} predictions for "
                      f"{len(run.labels)} labels in {prefix}val_labels.npy")
        if run.classes and len(run.classes) > MAX_CLASSES:
            utils.die(f"--cls_dir: {prefix}summary.json names {len(run.classes)} classes, more than the {MAX_CLASSES} "
                      "a confusion matrix is drawn for")
        bound = len(run.classes) if run.classes else MAX_CLASSES
        for path, v in ((f"{prefix}val_preds.npy", run.preds), (f"{prefix}val_labels.npy", run.labels)):
            if not np.issubdtype(v.dtype, np.integer) or v.min() < 0 or v.max() >= bound:
                unnamed = "" if run.classes else f" (no class names in {prefix}summary.json)"
                utils.die(f"--cls_dir: {path!r} should hold class indices in [0, {bound}){unnamed}, found "
                          f"{v.dtype} values in [{v.min()}, {v.max()}]")
        run.preds, run.labels = run.preds.astype(np.int64), run.labels.astype(np.int64)  # uint64 and int64 mix as float
        num_classes = len(run.classes) if run.classes else int(max(run.preds.max(), run.labels.max())) + 1
        run.classes = list(run.classes or [str(i) for i in range(num_classes)])
    elif role == "pretrained":
        missing.append(f"{prefix}val_{{preds,labels}}.npy (no confusion matrix)")
    check_summary(run, notes)
    return run


def check_summary(run: ClassifierRun, notes: list) -> None:
    """The summary is a convenience written alongside the arrays; a disagreement means a stale file."""
    if not run.summary or "val_acc" not in run.curves:
        return
    n = run_numbers(run)
    for key, value, close in (("best_val_acc", n["best_val_acc"], np.isclose),
                              ("best_epoch", n["best_epoch"], np.equal),
                              ("final_val_acc", n["final_val_acc"], np.isclose),
                              ("epochs", n["epochs"], np.equal)):
        if key in run.summary and not close(run.summary[key], value):
            notes.append(f"{run.name}_summary.json says {key} {run.summary[key]}, the .npy arrays give {value}: "
                         "the numbers come from the arrays")


# ----------------------------------------------------------------------------------------------------------
# Numbers: computed from the .npy arrays only

def first_argmax(values: np.ndarray) -> int:
    """Index of the best accuracy; the earliest epoch on ties, as a run keeping its best checkpoint would."""
    return int(np.nanargmax(values))


def best_index(name: str, values: np.ndarray) -> int:
    """Index of a monitor metric's best value: its lowest in LOWER_IS_BETTER, else its highest; the earliest on
    ties."""
    return int(np.nanargmin(values)) if name in LOWER_IS_BETTER else first_argmax(values)


def epoch_count(done: int, total) -> str:
    """'3', or '3 of 10' for a run stopped before its --total_epoch (--stop_after, a time limit): beside a finished
    run it would otherwise read as one. `total` is None where the run's files do not say."""
    return f"{done} of {total}" if isinstance(total, int) and total > done else f"{done}"


def epochs_text(done: int, total) -> str:
    """epoch_count with its unit: '1 epoch', '3 epochs', '1 of 2 epochs'."""
    count = epoch_count(done, total)
    return f"{count} epoch{'' if count == '1' else 's'}"


def run_total_epoch(run: ClassifierRun):
    """The --total_epoch a classifier run was started for, from its summary (or its args)."""
    return run.summary.get("total_epoch", run.args.get("total_epoch"))


def pretrain_numbers(pre: Pretraining) -> dict:
    losses = pre.losses
    out = {"epochs": len(losses), "first5": losses[:5], "last5": losses[-5:], "best_loss": losses[pre.best_epoch - 1],
           "best_epoch": pre.best_epoch, "final_loss": losses[-1]}
    for name, values in pre.evals.items():
        best = best_index(name, values)
        out[name] = {"final": values[-1], "final_epoch": int(pre.eval_epochs[-1]), "best": values[best],
                     "best_epoch": int(pre.eval_epochs[best])}
    return out


def run_numbers(run: ClassifierRun) -> dict:
    out = {}
    if "val_acc" in run.curves:
        acc = run.curves["val_acc"]
        best = first_argmax(acc)
        out.update(epochs=len(acc), best_val_acc=float(acc[best]), best_epoch=best + 1, final_val_acc=float(acc[-1]))
    if "train_loss" in run.curves:
        out["final_train_loss"] = float(run.curves["train_loss"][-1])
    return out


def confusion_counts(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_accuracy(counts: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(counts) / counts.sum(axis=1)  # NaN for a class with no val images


# ----------------------------------------------------------------------------------------------------------
# Figures

def loss_label(args: dict, log_scale: bool = False) -> str:
    target = "per-patch normalised pixels" if args.get("norm_pix_loss") else "pixels scaled to [-1, 1]"
    return f"MSE on masked patches{LOG_SCALE if log_scale else ''}\n({target})"


def epoch_tick_step(last_epoch: int) -> int:
    """Epochs between the ticks of an epoch axis: a round number giving at most 8 ticks, one that divides last_epoch
    when one does, so that the last epoch is labelled (0, 25, ..., 150, not 0, 20, ..., 140)."""
    steps = [1, 2, 5] + [int(m * 10 ** k) for k in range(1, len(str(last_epoch))) for m in (1, 2, 2.5, 5)]
    fits = [step for step in steps if last_epoch <= 8 * step]  # never empty: 5 * 10 ** (digits - 1) fits
    return next((step for step in fits if last_epoch % step == 0), fits[0])


def epoch_axis(ax, last_epoch: int, stretch: float = 1.0) -> None:
    """An axis of whole epochs up to last_epoch, ticked every epoch_tick_step. A short run's (at most 30 epochs)
    keeps half an epoch clear on either side of its points; a longer one's starts at 0. `stretch` widens the right
    for a label."""
    ax.set_xlabel("epoch")
    # MaxNLocator(integer=True) would tick a 1-epoch run at 0.6, 0.8, ... and a 150-epoch one up to 140 only
    ax.xaxis.set_major_locator(MultipleLocator(epoch_tick_step(last_epoch)))
    short = last_epoch <= 30
    ax.set_xlim(0.5 if short else 0, stretch * last_epoch + (0.5 if short else 1))


# Said in the label of a log y axis: over a narrow range its evenly spaced ticks (below) look linear.
LOG_SCALE = ", log scale"

# Below this ratio of an axis's highest to lowest value, a log axis's own ticks label one or two values at most (0.27
# to 0.33: only "0.3"), so log_y_axis spaces its ticks evenly there instead: the scale is nearly linear anyway.
NARROW_LOG_RANGE = 3.0


def labelled_mantissas(decades: float) -> tuple:
    """The multiples of each power of ten a log axis spanning `decades` labels: within about a decade the powers
    alone would leave it with one label or none (0.16 to 0.85 holds no power of ten)."""
    return (1, 1.5, 2, 3, 4, 5, 6, 8) if decades <= 1.2 else (1, 2, 5) if decades <= 2.5 else (1,)


class LogAxisTicks(Locator):
    """A log axis's major ticks, each labelled and gridded (the powers of ten and, within a decade or two, the
    labelled_mantissas between them), or its unlabelled minor ones (matplotlib's LogLocator); across less than
    NARROW_LOG_RANGE, evenly spaced major ticks and no minor ones. Decided at draw time, after every limit change."""

    def __init__(self, minor: bool):
        self.minor = minor

    def __call__(self):
        return self.tick_values(*self.axis.get_view_interval())

    def tick_values(self, vmin, vmax):
        lo, hi = sorted((vmin, vmax))
        if hi < NARROW_LOG_RANGE * lo:
            if self.minor:
                return []
            return [v for v in MaxNLocator(nbins=5, steps=[1, 2, 5, 10], min_n_ticks=3).tick_values(lo, hi) if v > 0]
        # Major ticks, not labelled minor ones: the grid is drawn at the major ticks, and a range within a decade
        # had no horizontal line at all.
        log = LogLocator(subs="auto" if self.minor else labelled_mantissas(np.log10(hi / lo)))
        log.set_axis(self.axis)
        return log.tick_values(lo, hi)


def log_y_axis(ax) -> None:
    """Log y axis labelled with plain numbers (0.05, 0.1, 0.2), not 5 x 10^-2; within a decade or two the powers
    of ten alone would leave the axis nearly unlabelled, so some multiples of them get a labelled tick too, and
    within less than a factor of NARROW_LOG_RANGE the ticks are evenly spaced (LogAxisTicks)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogAxisTicks(minor=False))
    ax.yaxis.set_minor_locator(LogAxisTicks(minor=True))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def curve_style(n: int) -> dict:
    # Markers only while they stay readable; a 150-epoch curve is a line.
    return {"marker": "o", "markersize": 3} if n <= 30 else {}


def annotate_best(ax, x, y, text: str, color: str, lowest: bool) -> None:
    """Star the best point and label it on the side where the curve cannot be: below a minimum, above a
    maximum, shifted towards the middle of the plot. Call after the axes limits are final."""
    ax.plot([x], [y], marker="*", markersize=11, color=color, markeredgecolor="black", markeredgewidth=0.5,
            zorder=5, linestyle="none")
    left, right = ax.get_xlim()
    to_left = x > left + 0.6 * (right - left)
    ax.annotate(text, xy=(x, y), xytext=(-8 if to_left else 8, -10 if lowest else 10), textcoords="offset points",
                ha="right" if to_left else "left", va="top" if lowest else "bottom", fontsize=8.5,
                bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": color, "lw": 0.7, "alpha": 0.9})


def make_room(ax, y, lowest: bool, share: float = 0.17, ceiling: float | None = None) -> bool:
    """Widen the y limits so the best point y sits at least `share` of the height from the bottom (a minimum)
    or the top (a maximum), which leaves room for its label. A non-negative quantity keeps 0 as the floor, and a
    bounded one (an accuracy) its `ceiling` as the top, a little above for the marker. -> whether the room is
    there: a maximum at the ceiling has none, and its label goes below it."""
    log = ax.get_yscale() == "log"
    to_axis = np.log10 if log else (lambda v: v)
    from_axis = (lambda v: 10 ** v) if log else (lambda v: v)
    lo, hi = (to_axis(v) for v in ax.get_ylim())
    y = to_axis(y)
    if lowest and y - lo < share * (hi - lo):
        new_lo = (y - share * hi) / (1 - share)
        ax.set_ylim(from_axis(new_lo if log or new_lo >= 0 or lo < 0 else 0.0), from_axis(hi))
    elif not lowest and hi - y < share * (hi - lo):
        ax.set_ylim(from_axis(lo), from_axis((y - share * lo) / (1 - share)))
    # A bounded quantity stops a little above its ceiling (the star at 100% stays whole), whatever raised the top:
    # the room made above, or matplotlib's own limits for a curve flat at it (a kNN at 100% all along). The room
    # above the best point is then what is left of it.
    top = None if ceiling is None else ceiling + 0.02 * (ceiling - lo)
    if top is not None and to_axis(ax.get_ylim()[1]) > top:
        ax.set_ylim(from_axis(lo), from_axis(top))
        return top - y >= share * (top - lo)
    return True


def loss_compared(runs: list) -> list:
    """The runs whose training losses the comparison figure draws: the fine-tunes. The probe's training loss is
    plain cross-entropy on its frozen features, the fine-tunes' the recipe's (on mixed, smoothed targets with
    `finetune`): not one quantity, so it has no place on their axes."""
    return [run for run in runs if not run.linear_probe]


def check_log_scale(pre, runs: list, cls_dir: str) -> None:
    """One-line death when a loss that --log_scale puts on a log axis holds a value <= 0: matplotlib leaves such
    points out with a warning at most, and the curve would be drawn without them."""
    drawn = []
    if pre is not None:
        drawn += [("--pretrain_dir", os.path.join(pre.folder, f"{name}.npy"), values)
                  for name, values in (("losses", pre.losses), ("val_loss", pre.evals.get("val_loss"))) if
                  values is not None]
    drawn += [("--cls_dir", os.path.join(cls_dir, f"{run.name}_train_loss.npy"), run.curves["train_loss"])
              for run in loss_compared(runs) if "train_loss" in run.curves]
    for flag, path, values in drawn:
        if (values <= 0).any():
            utils.die(f"--log_scale: {path!r} ({flag}) holds a loss of {values[values <= 0].min():g}, which a log "
                      "axis cannot show; leave out --log_scale")


def plot_loss_curve(pre: Pretraining, log_scale: bool):
    losses = pre.losses
    epochs = np.arange(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    ax.plot(epochs, losses, color=BLUE, **curve_style(len(losses)))
    if log_scale:
        log_y_axis(ax)
    epoch_axis(ax, len(losses))
    best = pre.best_epoch
    make_room(ax, losses[best - 1], lowest=True)
    annotate_best(ax, best, losses[best - 1], f"best {losses[best - 1]:.5f} (epoch {best})", BLUE, lowest=True)
    ax.set_ylabel(loss_label(pre.args, log_scale))
    on = data_caption(pre.args, val=False)
    count = epochs_text(len(losses), pre.args.get("total_epoch"))
    ax.set_title(f"MAE pretraining{' on ' + on if on else ''}: training loss per epoch ({count})")
    return fig


def star_best_evaluation(ax, pre: Pretraining, name: str, values: np.ndarray, color: str, shown,
                         ceiling: float | None = None) -> None:
    """Star a monitor metric's best evaluated epoch (best_index) on ax, labelled `best <shown(value)> (epoch e)`,
    with room made for the label (below a maximum at its ceiling, where there is none above). Call after the axes
    limits are final."""
    best, lowest = best_index(name, values), name in LOWER_IS_BETTER
    room = make_room(ax, values[best], lowest, ceiling=ceiling)
    epoch = pre.eval_epochs[best]
    annotate_best(ax, epoch, values[best], f"best {shown(values[best])} (epoch {epoch})", color,
                  lowest=lowest or not room)


def plot_monitor(pre: Pretraining, log_scale: bool):
    """Training loss (with the val loss under fixed masks), val PSNR and kNN accuracy against epoch."""
    panels = ["loss"] + [n for n in MONITOR_PANELS if n in pre.evals]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.5), squeeze=False, sharex=True)
    axes = axes[0]
    epochs = np.arange(1, len(pre.losses) + 1)
    ax = axes[0]
    ax.plot(epochs, pre.losses, color=BLUE, label="train (mean over the epoch)", **curve_style(len(epochs)))
    if "val_loss" in pre.evals:
        ax.plot(pre.eval_epochs, pre.evals["val_loss"], color=VERMILLION, linestyle="--", marker="o",
                markersize=4, label="val (fixed masks)")
    if log_scale:
        log_y_axis(ax)
    last_epoch = max(len(pre.losses), int(pre.eval_epochs.max()))
    epoch_axis(ax, last_epoch, stretch=1.04)  # stretched: a label at the last epoch fits
    if "val_loss" in pre.evals:
        # The held-out loss is this panel's measure, as each other panel's metric is its own: its best is starred.
        # (The training loss's best has its own figure, loss_curve.png.)
        star_best_evaluation(ax, pre, "val_loss", pre.evals["val_loss"], VERMILLION, lambda v: f"val {v:.5f}")
    ax.set_ylabel(loss_label(pre.args, log_scale))
    ax.set_title("reconstruction loss")
    ax.legend(loc="best")
    for ax, name in zip(axes[1:], panels[1:]):
        scale, color, ylabel, title, unit = MONITOR_PANELS[name]
        if name == "knn_acc" and "knn_k" in pre.args:
            title += f" ({pre.args['knn_k']}-NN)"
        values = pre.evals[name] * scale
        ax.plot(pre.eval_epochs, values, color=color, marker="o", markersize=4)
        epoch_axis(ax, last_epoch, stretch=1.04)
        ax.tick_params(labelbottom=True)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        star_best_evaluation(ax, pre, name, values, color, lambda v: f"{v:.2f}{unit}",
                             ceiling=100.0 if name == "knn_acc" else None)
    caption = data_caption(pre.args)
    fig.suptitle(f"MAE pretraining monitor{': ' + caption if caption else ''}", fontsize=11)
    return fig


def comparison_subject(labels: list) -> str:
    """What a comparison figure's title says it compares: the runs it draws (their ClassifierRun.label), not the
    full experiment's three."""
    subjects = ["from scratch"] if ROLES["scratch"][0] in labels else []
    if ROLES["pretrained"][0] in labels:
        # Its fine-tune and its linear probe drawn together (a panel each) are one encoder shown two ways.
        subjects.append("MAE-pretrained (fine-tuned, linear probe)" if ROLES["linprobe"][0] in labels
                        else "MAE-pretrained")
    elif ROLES["linprobe"][0] in labels:
        if ROLES["random_probe"][0] in labels and not subjects:  # the two probes alone
            return "linear probe, MAE-pretrained vs random encoder"
        subjects.append("MAE-pretrained (linear probe)")
    if ROLES["random_probe"][0] in labels:
        subjects.append("random encoder (linear probe)")
    return " vs ".join(subjects)


def run_style(run: ClassifierRun, runs: list) -> tuple:
    """A run's (label, colour, line style) in the comparisons: those of what it is (its label), so that a run looks
    the same whichever flag named it; those of that flag where two runs drawn together are the same thing."""
    role = next((key for key, (label, _, _) in ROLES.items() if label == run.label), run.role)
    return ROLES[run.role if sum(r.label == run.label for r in runs) > 1 else role]


def plot_run_comparison(runs: list, curve: str, log_scale: bool):
    """One curve of every classifier run; the best epoch of each is starred and named in the legend. The linear
    probes get axes of their own beside the fine-tunes', with the same y axis: the probe's 100 epochs on the
    fine-tunes' x axis would squeeze the reference experiment's 50-epoch fine-tunes into half of it."""
    accuracy = curve.endswith("acc")
    scale = 100.0 if accuracy else 1.0
    drawn = [run for run in runs if curve in run.curves]
    groups = [g for g in ([r for r in drawn if not r.linear_probe], [r for r in drawn if r.linear_probe]) if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(8.0 + 3.5 * (len(groups) - 1), 3.8), sharey=True,
                             squeeze=False)
    handles, labels = [], []
    for ax, group in zip(axes[0], groups):
        longest = 1
        for run in group:
            _, color, linestyle = run_style(run, runs)
            label = run.label if run.name == DEFAULT_NAMES.get(run.role, run.role) else f"{run.label} ({run.name})"
            values = run.curves[curve] * scale
            epochs = np.arange(1, len(values) + 1)
            longest = max(longest, len(values))
            # Broken lines above solid ones: where two runs' curves meet, both stay visible.
            line, = ax.plot(epochs, values, color=color, linestyle=linestyle, zorder=2 if linestyle == "-" else 2.5,
                            **curve_style(len(values)))
            best = first_argmax(values) if accuracy else int(np.nanargmin(values))
            star, = ax.plot([best + 1], [values[best]], marker="*", markersize=11, color=color,
                            markeredgecolor="black", markeredgewidth=0.5, linestyle="none", zorder=5)
            text = f"{values[best]:.2f}%" if accuracy else f"{values[best]:.4f}"
            handles.append((line, star))
            labels.append(f"{label}\nbest {text} at epoch {best + 1}")
        if log_scale and not accuracy:
            log_y_axis(ax)
        epoch_axis(ax, longest)
    ax = axes[0][0]
    captions = {data_caption(run.args, val=accuracy) for run in drawn if run.args}
    caption = f"\n{captions.pop()}" if len(captions) == 1 else ""  # runs on different data: no one caption
    subject = comparison_subject([run.label for run in drawn])
    if accuracy:
        ax.set_ylabel("validation top-1 accuracy (%)")
        title = f"Validation accuracy: {subject}{caption}"
    else:
        ax.set_ylabel(f"training loss{LOG_SCALE if log_scale else ''}\n(cross-entropy, the recipe's targets)")
        title = f"Fine-tuning training loss: {subject}{caption}"  # main leaves a linear probe's out
    # Over the whole figure, legend included: over the axes alone, a long title ran past the figure's left edge.
    fig.suptitle(title, fontsize=STYLE["axes.titlesize"])
    if len(groups) > 1:
        for panel, group in zip(axes[0], groups):
            panel.set_title("linear probe (frozen encoder)" if group[0].linear_probe else "fine-tuned",
                            fontsize=STYLE["font.size"])
    # The legend goes beside the axes: curves of any shape stay uncovered.
    axes[0][-1].legend(handles, labels, handler_map={tuple: HandlerTuple(ndivide=None, pad=0.6)}, handlelength=5.0,
                       loc="upper left", bbox_to_anchor=(1.02, 1.0), labelspacing=1.0, borderaxespad=0)
    return fig


def plot_confusion(run: ClassifierRun):
    counts = confusion_counts(run.preds, run.labels, len(run.classes))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / counts.sum(axis=1, keepdims=True) * 100  # % of each true class
    k = len(run.classes)
    size = max(5.2, min(0.55 * k + 1.8, 9.0))
    fig, ax = plt.subplots(figsize=(size + 0.9, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    cbar = fig.colorbar(image, ax=ax, shrink=0.8, pad=0.02)
    cbar.set_label("share of the true class (%)")
    ax.grid(False)
    ax.spines[:].set_visible(False)
    if k <= 20:  # class names and a percentage in every cell stay legible up to about 20 classes
        ax.set_xticks(range(k), run.classes, rotation=45, ha="right", rotation_mode="anchor")
        # Each row's number of images: a share of a few images (a small val split, a rare class) reads differently.
        ax.set_yticks(range(k), [f"{name} ({n:,})" for name, n in zip(run.classes, counts.sum(axis=1))])
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, f"{share[i, j]:.0f}" if share[i, j] >= 9.5 else f"{share[i, j]:.1f}",
                            ha="center", va="center", fontsize=8 if k <= 12 else 6.5,
                            color="white" if share[i, j] > 55 else "black")
    if k > 20:  # matplotlib's own ticks, made whole class indices (21 classes were ticked at 2.5, 7.5, ...)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(length=0)
    # Beyond 20 classes the ticks are class indices, with neither names nor counts.
    ax.set_xlabel("predicted class" if k <= 20 else "predicted class (index)")
    ax.set_ylabel("true class (images)" if k <= 20 else "true class (index)")
    accuracy = np.trace(counts) / counts.sum() * 100
    ax.set_title(f"Confusion matrix, {run.label}\n{len(run.labels):,} val images, last epoch, top-1 {accuracy:.2f}% "
                 "(row-normalised, %)")
    return fig


def save_figure(fig, path: str, dpi: int) -> None:
    try:
        with utils.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:  # pyplot keeps every open figure: one left by a failed save would stay for the process's life
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Report

def fmt_losses(values) -> str:
    return ", ".join(f"{v:.5f}" for v in values)


def pct(value: float) -> str:
    return f"{100 * value:.2f}%" if np.isfinite(value) else "n/a"  # n/a: a class with no val images


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.2f} h"


def val_split(args: dict) -> str:
    """Which images the val numbers come from, as the run's data flags chose them."""
    if not args:
        return ""
    if args.get("val_split"):
        return f"{args['val_split']} held-out train images"
    return {"cifar10": "test set", "cifar100": "test set", "fake": "synthetic val set"}.get(
        args.get("dataset"), "val/ or test/ folder")


def data_caption(args: dict, val: bool = True) -> str:
    """What a figure's run trained on (and, with val, which images its val numbers come from); '' without
    args.json. A synthetic smoke run's figure then cannot pass for a CIFAR-10 one."""
    if not args:
        return ""
    name = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "fake": "synthetic images (--dataset fake)",
            "folder": "image folder"}.get(args.get("dataset"), str(args.get("dataset")))
    return f"{name}; val: {val_split(args)}" if val else name


def pretrain_config(pre: Pretraining) -> str:
    a = pre.args
    if not a:
        return "no args.json"
    # The schedule decides how the first losses compare with the reference's; args.json from before --schedule
    # existed ran warmup_cosine, the only one then.
    return (f"--dataset {a.get('dataset')}, --total_epoch {a.get('total_epoch')}, --warmup_epoch "
            f"{a.get('warmup_epoch')}, --schedule {a.get('schedule', 'warmup_cosine')}, --batch_size "
            f"{a.get('batch_size')}, --mask_ratio {a.get('mask_ratio')}, --device {a.get('device')}; encoder "
            f"{a.get('embed_dim')} x {a.get('depth')} blocks, decoder {a.get('decoder_embed_dim')} x "
            f"{a.get('decoder_depth')}, patch {a.get('patch_size')}; val numbers on the {val_split(a)}")


def command_line(args) -> str:
    """The command that regenerates this report: the flags that differ from their defaults."""
    defaults = vars(get_args_parser().parse_args([]))
    flags = [f"--{k} {v!r}" if isinstance(v, str) and (not v or " " in v) else f"--{k} {v}"
             for k, v in vars(args).items() if v != defaults[k] and not isinstance(v, bool)]
    flags += [f"--{k}" for k, v in vars(args).items() if v is True and v != defaults[k]]
    return " ".join(["python plot_results.py", *flags])


def report_pretraining(pre: Pretraining, n: dict, figures: dict, rel) -> list:
    lines = ["## MAE pretraining", "", f"From `{pre.folder}` ({pretrain_config(pre)}).", "",
             "| quantity | value |", "| --- | --- |",
             f"| epochs | {epoch_count(n['epochs'], pre.args.get('total_epoch'))} |",
             f"| first 5 losses | {fmt_losses(n['first5'])} |",
             f"| last 5 losses | {fmt_losses(n['last5'])} |",
             f"| best loss (epoch) | {n['best_loss']:.5f} ({n['best_epoch']}) |",
             f"| final loss | {n['final_loss']:.5f} |"]
    seconds = [r["seconds"] for r in pre.log  # a hand-edited log may hold anything: a number or no row
               if utils.is_number(r.get("seconds")) and r["epoch"] <= n["epochs"]]
    if len(seconds) == n["epochs"]:
        lines.append(f"| training time (sum of epochs, log.jsonl) | {duration(sum(seconds))} |")
    for name, label, show in (("knn_acc", "kNN top-1 on val", pct),
                              ("val_loss", "val masked MSE (fixed masks)",
                               lambda v: f"{v:.5f}" if np.isfinite(v) else "n/a"),  # n/a: a gap in the curve
                              ("val_psnr", "val PSNR of masked patches",
                               lambda v: f"{v:.2f} dB" if np.isfinite(v) else "n/a")):
        if name in n:
            e = n[name]
            lines.append(f"| {label}, final (epoch) | {show(e['final'])} ({e['final_epoch']}) |")
            lines.append(f"| {label}, best (epoch) | {show(e['best'])} ({e['best_epoch']}) |")
    lines.append("")
    for key, caption in (("loss_curve", "MAE loss per epoch"), ("pretrain_monitor", "pretraining monitor"),
                         ("best_recon", f"reconstructions at the lowest-loss epoch ({n['best_epoch']})"),
                         ("last_recon", f"reconstructions at the last epoch ({n['epochs']})")):
        if key in figures:
            lines += [f"![{caption}]({rel(figures[key])})", ""]
    return lines


def encoder_starts(runs: list) -> dict:
    """{(MAE checkpoint path, its encoder weights' SHA-256): names of the runs that started from it}, from the
    summaries (train_classifier.py keeps the digest since 2026-11-29; older runs are left out)."""
    starts = {}
    for run in runs:
        if run.summary.get("pretrained_sha256"):
            key = (run.summary.get("pretrained_model_path"), run.summary["pretrained_sha256"])
            starts.setdefault(key, []).append(run.name)
    return starts


def encoder_size_notes(runs: list) -> list:
    """A note when the classifier runs' encoders differ in size, by the sizes each run's args.json records (the
    model it built): scratch and pretrained would then compare two models, not a pretraining against none."""
    sizes = {}
    for run in runs:
        if None not in run.encoder_size:
            sizes.setdefault(run.encoder_size, []).append(run.name)
    if len(sizes) < 2:
        return []
    return ["the classifier runs' encoders differ in size (" + "; ".join(
        f"{', '.join(names)}: patch {patch}, width {width}, {depth} blocks, {heads} heads"
        for (patch, width, depth, heads), names in sizes.items()) + "): their accuracies compare different models"]


def other_pretraining_notes(pre: Pretraining, starts: dict) -> list:
    """Notes for the runs that did not start from the encoder of --pretrain_dir's last epoch, told by the SHA-256
    each line of its log.jsonl names: a rerun of the pretraining after the fine-tunes would otherwise be reported
    beside them as their start. Nothing is said when a line names none (an older version wrote the log)."""
    written = {r.get("encoder_sha256"): r["epoch"] for r in pre.log}
    if not pre.log or not all(isinstance(digest, str) for digest in written):
        return []
    last = len(pre.losses)
    notes = []
    for (path, digest), names in starts.items():
        runs = ", ".join(names)
        if digest not in written:
            notes.append(f"{runs} started from an MAE encoder ({path}, SHA-256 {digest[:12]}) that the pretraining "
                         f"in {pre.folder} never wrote: the pretraining reported here is not theirs")
        elif written[digest] != last:
            notes.append(f"{runs} started from the encoder of epoch {written[digest]} of the pretraining in "
                         f"{pre.folder}, not of its last epoch ({last}), which the pretraining section reports")
    return notes


def test_split_sentence(runs: list, quote: str = "`") -> str:
    """The report's (and, unquoted, the printed note's) warning that runs picked their best epoch on the test set:
    '' when none did."""
    on_test = [run.name for run in runs if val_split(run.args) == "test set"]
    if not on_test:
        return ""
    names = ", ".join(f"{quote}{name}{quote}" for name in on_test)
    if len(on_test) == 1:
        said = (f"The val split of {names} is the test set, so its best epoch was picked on the test set itself: its "
                "final epoch's accuracy is the unbiased one.")
    else:
        said = (f"The val splits of {names} are the test set, so their best epochs were picked on the test set "
                "itself: their final epochs' accuracies are the unbiased ones.")
    return f"{said} Tune with {quote}--val_split{quote} instead."


def report_classifiers(runs: list, figures: dict, rel) -> list:
    lines = ["## Classification", "",
             "| run | init | recipe | data (val split) | epochs | best val acc (epoch) | final val acc | "
             "final train loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        n = run_numbers(run)
        best = f"{pct(n['best_val_acc'])} ({n['best_epoch']})" if "best_val_acc" in n else ""
        final = pct(n["final_val_acc"]) if "final_val_acc" in n else ""
        loss = f"{n['final_train_loss']:.4f}" if "final_train_loss" in n else ""
        # A probe's recipe flags default to train_classifier.PROBE_SETTINGS whatever --recipe, which sets its lr
        # schedule only: naming the recipe would claim augmentation it did not have.
        recipe = "linear probe" if run.linear_probe else run.summary.get("recipe", "")
        split = f"{run.args.get('dataset')} ({val_split(run.args)})" if run.args else ""
        epochs = epoch_count(n["epochs"], run_total_epoch(run)) if "epochs" in n else ""
        lines.append(f"| {run.name} | {run.label} | {recipe} | {split} | {epochs} | {best} | "
                     f"{final} | {loss} |")
    lines.append("")
    for gain in pretraining_gains(runs):
        lines += [f"What the pretraining is worth: {gain}.", ""]
    for (path, digest), names in encoder_starts(runs).items():
        lines += [f"{', '.join(f'`{name}`' for name in names)} started from the MAE encoder of `{path}` (its "
                  f"weights' SHA-256 `{digest[:12]}`).", ""]
    on_test = test_split_sentence(runs)
    if on_test:
        lines += [on_test, ""]
    for run in runs:
        n = run_numbers(run)
        if run.linear_probe and "best_val_acc" in n:
            lines += [f"Linear-probe accuracy (`{run.name}`): {pct(n['best_val_acc'])} best (epoch "
                      f"{n['best_epoch']}), {pct(n['final_val_acc'])} final.", ""]
    with_preds = [r for r in runs if r.preds is not None]
    if with_preds:
        classes = with_preds[0].classes
        acc = {r.name: per_class_accuracy(confusion_counts(r.preds, r.labels, len(r.classes))) for r in with_preds}
        same = [r for r in with_preds if r.classes == classes]
        lines += ["Per-class val accuracy (last epoch):", "",
                  "| class | " + " | ".join(r.name for r in same) + " |",
                  "| --- |" + " --- |" * len(same)]
        for i, name in enumerate(classes):
            lines.append(f"| {name} | " + " | ".join(pct(acc[r.name][i]) for r in same) + " |")
        lines.append("")
        others = [r.name for r in with_preds if r.classes != classes]
        if others:  # their rows would be other classes' under these names
            lines += [f"Left out of that table: {', '.join(f'`{name}`' for name in others)}, on other classes than "
                      f"`{with_preds[0].name}`'s.", ""]
        focus = next((r for r in with_preds if r.role == "pretrained"), with_preds[0])
        lines += [f"Most frequent confusions of `{focus.name}` (share of the true class):", ""]
        lines += [f"- {t} -> {p}: {s:.1f}% ({c} images)" for t, p, s, c in top_confusions(focus)] + [""]
    for key, caption in (("cls_train_loss_compare", "training loss"), ("cls_val_acc_compare", "validation accuracy"),
                         ("preds_grid", "predictions on val images: ✓ right, ✗ wrong (true class in brackets)"),
                         ("confusion_matrix", "confusion matrix")):
        if key in figures:
            lines += [f"![{caption}]({rel(figures[key])})", ""]
    return lines


def top_confusions(run: ClassifierRun, count: int = 5) -> list:
    counts = confusion_counts(run.preds, run.labels, len(run.classes))
    off = counts.astype(np.float64)
    np.fill_diagonal(off, 0)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(off, rows, out=np.zeros_like(off), where=rows > 0) * 100
    order = np.lexsort((-off.ravel(), -share.ravel()))[:count]  # by share, then by images
    # Only confusions that happened: with fewer than `count` of them, no correct prediction fills the list.
    return [(run.classes[i], run.classes[j], share[i, j], int(off[i, j]))
            for i, j in zip(*np.unravel_index(order, share.shape)) if off[i, j]]


# The report's headline pairs: (the kind of run both are, what the difference compares, the label of the run from
# the MAE encoder, the label of its baseline).
GAIN_PAIRS = (("fine-tunes", "from the MAE encoder against from scratch", ROLES["pretrained"][0],
               ROLES["scratch"][0]),
              ("linear probes", "under a linear probe, the MAE encoder against a random one",
               ROLES["linprobe"][0], ROLES["random_probe"][0]))


def run_setting(run: ClassifierRun) -> dict:
    """What two runs must share for their accuracies to measure the pretraining alone, from their files."""
    return {"epochs": epoch_count(len(run.curves["val_acc"]), run_total_epoch(run)), "data": run.args.get("dataset"),
            "val split": val_split(run.args), "encoder size": run.encoder_size,
            "pooling": run.args.get("global_pool"), "recipe": run.args.get("recipe")}


def pretraining_gains(runs: list) -> list:
    """What the pretraining is worth, the report's headline: for each of GAIN_PAIRS with a run of each label, the MAE
    run's final and best val accuracy less its baseline's, in points; two runs of one label give none, and the line
    says so. Where the two did not run alike (run_setting), it says so in place of a difference that would mislead:
    a fine-tune stopped early would read as pretraining worth less, a probe of the mean patch token against one of
    the class token as pretraining worth more."""
    gains = []
    for kind, subject, mae_label, baseline_label in GAIN_PAIRS:
        mae = [r for r in runs if r.label == mae_label and "val_acc" in r.curves]
        baseline = [r for r in runs if r.label == baseline_label and "val_acc" in r.curves]
        if not mae or not baseline:
            continue
        if len(mae) > 1 or len(baseline) > 1:  # two runs named of one kind (say, probes of two poolings)
            alike = mae if len(mae) > 1 else baseline
            gains.append(f"not given for the {kind}, as {' and '.join(r.name for r in alike)} are each a run of "
                         f"'{alike[0].label}'")
            continue
        (m_run,), (b_run,) = mae, baseline
        m_setting, b_setting = run_setting(m_run), run_setting(b_run)
        unlike = [what for what in m_setting if m_setting[what] != b_setting[what]]
        if unlike:
            gains.append(f"not given, as the two {kind} ({m_run.name}, {b_run.name}) differ in {', '.join(unlike)}")
            continue
        m, b = run_numbers(m_run), run_numbers(b_run)
        points = (lambda key: f"{100 * (m[key] - b[key]):+.2f} points ({pct(m[key])} against {pct(b[key])})")
        gains.append(f"{subject} ({m_run.name} - {b_run.name}): final val acc {points('final_val_acc')}, best "
                     f"{points('best_val_acc')}")
    return gains


def summary_lines(pre, runs) -> list:
    lines = []
    if pre is not None:
        n = pretrain_numbers(pre)
        lines += [f"pretraining ({pre.folder}): {epochs_text(n['epochs'], pre.args.get('total_epoch'))}, best loss "
                  f"{n['best_loss']:.5f} at epoch {n['best_epoch']}, final {n['final_loss']:.5f}",
                  f"  first 5: {fmt_losses(n['first5'])}", f"  last 5:  {fmt_losses(n['last5'])}"]
        if "knn_acc" in n:
            k = n["knn_acc"]
            lines.append(f"  kNN top-1: final {pct(k['final'])} (epoch {k['final_epoch']}), best {pct(k['best'])} "
                         f"(epoch {k['best_epoch']})")
    for run in runs:
        n = run_numbers(run)
        if "best_val_acc" in n:
            lines.append(f"{run.name} ({run.label}): best val acc {pct(n['best_val_acc'])} at epoch "
                         f"{n['best_epoch']}, final {pct(n['final_val_acc'])} "
                         f"({epochs_text(n['epochs'], run_total_epoch(run))})")
    return lines + [f"what the pretraining is worth: {gain}" for gain in pretraining_gains(runs)]


# ----------------------------------------------------------------------------------------------------------

def draw_figures(pre, runs: list, args, missing: list) -> dict:
    """Draw (or, for the reconstructions, copy) every figure the inputs give, beside the files they come from.
    -> {figure key: path}; a reconstruction that is not there goes on `missing`."""
    figures = {}
    with plt.rc_context(STYLE):
        if pre is not None:
            figures["loss_curve"] = os.path.join(pre.folder, "loss_curve.png")
            save_figure(plot_loss_curve(pre, args.log_scale), figures["loss_curve"], args.dpi)
            if pre.evals:
                figures["pretrain_monitor"] = os.path.join(pre.folder, "pretrain_monitor.png")
                save_figure(plot_monitor(pre, args.log_scale), figures["pretrain_monitor"], args.dpi)
            for key, epoch in (("best_recon", pre.best_epoch), ("last_recon", len(pre.losses))):
                src = os.path.join(pre.folder, f"recon_epoch_{epoch:03d}.png")
                if os.path.isfile(src):
                    figures[key] = os.path.join(pre.folder, f"{key}.png")
                    utils.atomic_copy(src, figures[key])
                else:
                    missing.append(f"{src} (no {key}.png)")
        if runs:
            for key, curve, shown in (("cls_train_loss_compare", "train_loss", loss_compared(runs)),
                                      ("cls_val_acc_compare", "val_acc", runs)):
                if any(curve in r.curves for r in shown):
                    figures[key] = os.path.join(args.cls_dir, f"{key}.png")
                    save_figure(plot_run_comparison(shown, curve, args.log_scale), figures[key], args.dpi)
            pretrained = next((r for r in runs if r.role == "pretrained"), None)
            if pretrained is not None and pretrained.preds_grid:
                figures["preds_grid"] = pretrained.preds_grid
            if pretrained is not None and pretrained.preds is not None:
                figures["confusion_matrix"] = os.path.join(args.cls_dir, "confusion_matrix.png")
                save_figure(plot_confusion(pretrained), figures["confusion_matrix"], args.dpi)
    return figures


def remove_undrawn_figures(args, pre, runs: list, figures: dict) -> list:
    """Remove each figure of this script's, in a folder it drew into, that this call did not draw: it is an earlier
    call's, from inputs that have changed since (a rerun without evaluations, a run no longer named), and would sit
    beside this call's figures as theirs. The training scripts remove an earlier run's leftovers the same way.
    -> the paths removed."""
    removed = []
    for folder, used, figure_names in ((args.pretrain_dir, pre is not None, PRETRAIN_FIGURES),
                                       (args.cls_dir, bool(runs), CLS_FIGURES)):
        for name in figure_names if used else ():
            path = os.path.join(folder, name)
            if name.removesuffix(".png") not in figures and os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    return removed


def random_probe_name(args) -> str:
    """--random_probe_run, or by default RANDOM_PROBE_NAME where --cls_dir holds that run's arrays and no other
    flag names it (the README's older --linprobe_run linprobe_random); '' for none."""
    if args.random_probe_run is not None:
        return args.random_probe_run
    taken = (args.scratch_run, args.pretrained_run, args.linprobe_run)
    there = run_curve_files(args.cls_dir, RANDOM_PROBE_NAME)  # what load_classifier_run reads as a run
    return RANDOM_PROBE_NAME if there and RANDOM_PROBE_NAME not in taken else ""


def main(args):
    # ---- read and check every input before writing anything
    if not 72 <= args.dpi <= 600:  # a 10-inch figure at 600 dpi is already 6,000 pixels wide
        utils.die(f"--dpi must be in [72, 600], got {args.dpi}")
    names = [(args.scratch_run, "scratch"), (args.pretrained_run, "pretrained"), (args.linprobe_run, "linprobe"),
             (random_probe_name(args), "random_probe")]
    named = [n for n, _ in names if n]
    if len(set(named)) < len(named):
        utils.die(f"--scratch_run, --pretrained_run, --linprobe_run and --random_probe_run must differ, got {named}")
    # .md only: the report then cannot replace one of the inputs it is made from (.npy, .json, .jsonl).
    utils.check_output_file("--report", args.report, (".md",), create_folder=False)
    # A missing folder is reported as missing inputs; a file there is a slip (a checkpoint for its outputs folder)
    # that would otherwise rewrite the report without the runs it names.
    for flag, folder in (("--pretrain_dir", args.pretrain_dir), ("--cls_dir", args.cls_dir)):
        utils.check_not_a_file(flag, folder)
    missing, notes = [], []
    pre = load_pretraining(args.pretrain_dir, missing, notes)
    runs = []
    for name, role in names:
        if name:
            run = load_classifier_run(args.cls_dir, name, role, missing, notes)
            runs += [run] if run else []
    starts = encoder_starts(runs)
    if len({digest for _, digest in starts}) > 1:  # a pretraining rewrites its checkpoint after every epoch
        notes.append("the classifier runs started from different MAE encoders (" + "; ".join(
            f"{', '.join(names)}: {path}, SHA-256 {digest[:12]}" for (path, digest), names in starts.items())
            + "): their numbers are not one experiment's")
    notes += encoder_size_notes(runs)
    if pre is not None:
        notes += other_pretraining_notes(pre, starts)
    if pre is None and not runs:
        run_names = ", ".join(n for n, _ in names if n) or "none"
        utils.die(f"nothing to plot: no {os.path.join(args.pretrain_dir, 'losses.npy')} (--pretrain_dir) and no "
                  f"classifier run ({run_names}) in --cls_dir {args.cls_dir!r}")
    if args.log_scale:
        check_log_scale(pre, runs, args.cls_dir)
    # The figures go beside the runs' files: those folders must take them, checked before the first is drawn.
    for flag, folder, used, figure_names in (("--pretrain_dir", args.pretrain_dir, pre is not None, PRETRAIN_FIGURES),
                                             ("--cls_dir", args.cls_dir, bool(runs), CLS_FIGURES)):
        if used:
            utils.check_output_folder(flag, folder, create=False)
            utils.check_no_folder_at(flag, folder, figure_names)

    # ---- figures, beside the files they come from
    figures = draw_figures(pre, runs, args, missing)
    removed = remove_undrawn_figures(args, pre, runs, figures)

    # ---- numbers: printed and written to the report
    report_dir = os.path.dirname(os.path.abspath(args.report))

    def rel(path):
        return os.path.relpath(os.path.abspath(path), report_dir).replace(os.sep, "/")

    lines = ["# Results", "",
             f"Regenerated by `{command_line(args)}` from `{args.pretrain_dir}` and `{args.cls_dir}`. Every "
             "number is computed from the .npy files the runs wrote.", ""]
    if pre is not None:
        lines += report_pretraining(pre, pretrain_numbers(pre), figures, rel)
    if runs:
        lines += report_classifiers(runs, figures, rel)
    if missing or notes:
        lines += ["## Missing inputs", ""] + [f"- `{m}`" for m in missing] + [f"- {n}" for n in notes] + [""]
    with utils.atomic_path(args.report) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines))

    print("\n".join(summary_lines(pre, runs)))
    for note in notes:
        print(f"note: {note}")
    on_test = test_split_sentence(runs, quote="")
    if on_test:
        print(f"note: {on_test[0].lower()}{on_test[1:]}")  # lower case, as the other notes
    if missing:
        print(f"missing: {'; '.join(missing)}")
    if removed:
        print(f"removed an earlier call's figures, which these inputs no longer draw: {', '.join(removed)}")
    print(f"wrote {args.report} and {len([k for k in figures if k != 'preds_grid'])} figures: "
          + ", ".join(v for k, v in figures.items() if k != "preds_grid"))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
