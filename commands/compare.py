"""`python -m commands.compare`: every experiment's headline metrics and the params that differ between the
experiments themselves, in one table that fits the terminal (150 columns when it cannot tell).

`dvc exp show --only-changed` compares each experiment with its baseline commit: when the commit holds the
Stanford Cars defaults and every run passes a CPU trial's params with -S, all of them "changed" (316 columns,
the one param that differs cut off at 150). Here only what differs among the runs listed is shown. The
experiments of the current commit are listed, with the commit itself when it holds a run; `--rev REV` lists
another commit's, `--all-commits` every commit's (an experiment made before a commit stays in the table; DVC
then reads every commit of the history: 27 s for this project's 177, against 1.2 s for one).

Below the table, every run is paired with the best one (highest top-1) on the same test images: the exact
McNemar test on their per-image correctness (plots/predictions.csv, kept in git by each run), so that a
difference of a few images is called what it is, within noise, with the test size such a difference would need.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import textwrap
import unicodedata

from commands import int_at_least
from finetune.errors import StageError, run_stage
from finetune.paths import EVAL_METRICS, PREDICTIONS_CSV, PROBE_METRICS
from finetune.stats import correct_by_id, images_for_significance, paired, points, wilson_interval

DEFAULT_WIDTH = 150
METRICS = (("top1", "top1"), ("top5", "top5"), ("mean_class_accuracy", "mean/class"), ("tta.top1", "TTA top1"),
           ("probe_top1", "probe top1"), ("kept_epoch", "epoch"))
MAX_CELL = 26  # columns of one value; longer ones (paths) are cut in the middle
MAX_NAME = 40  # columns of an experiment's name: a long one is cut in the middle so the metrics stay in view
MIN_WIDTH = 40
SEPARATOR = "  "
ELLIPSIS = "…"  # "..." when the terminal's encoding has no "…" (set in main)


def display_width(text: str) -> int:
    """Terminal columns of `text`: CJK ideographs and most emoji take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text: str, width: int) -> str:
    return text + " " * max(0, width - display_width(text))


def cut_to(text: str, width: int) -> str:
    """`text` within `width` columns: its head and tail kept, the middle replaced by the ellipsis."""
    if display_width(text) <= width:
        return text
    keep = width - display_width(ELLIPSIS)
    head, tail = "", ""
    for char in text:
        if display_width(head + char) > (keep + 1) // 2:
            break
        head += char
    for char in reversed(text):
        if display_width(head + tail + char) > keep:
            break
        tail = char + tail
    return head + ELLIPSIS + tail


def clip(line: str, width: int) -> str:
    """The line's first `width` columns."""
    kept, used = "", 0
    for char in line:
        used += display_width(char)
        if used > width:
            break
        kept += char
    return kept


def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def runs_of(shown: list[dict]) -> list[dict]:
    """One row per experiment (and per commit holding metrics of its own), oldest first:
    {name, created, params (flat), metrics (flat)}."""
    rows = []

    def add(name: str, record: dict) -> None:
        data = record.get("data") or {}
        files = data.get("metrics") or {}
        metrics = (files.get(str(EVAL_METRICS)) or {}).get("data")
        probe = (files.get(str(PROBE_METRICS)) or {}).get("data") or {}
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        if metrics and params:
            rows.append({"name": name, "rev": record.get("rev"), "created": data.get("timestamp") or "",
                         "params": flatten(params),
                         "metrics": flatten(metrics | probe)})

    for commit in shown:
        if commit.get("rev") == "workspace":
            continue  # the workspace repeats the applied experiment or the last commit
        add(f"{commit.get('name') or commit['rev'][:7]} (commit)", commit)
        for experiment in commit.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                add(revision.get("name") or revision["rev"][:7], revision)
    return sorted(rows, key=lambda row: row["created"])


def cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.4f}" if 0 < abs(value) < 1 else f"{value:g}"
    elif isinstance(value, list):
        text = ",".join(cell(v) for v in value)
    elif value is None:
        text = "null"
    else:
        text = str(value)
    return cut_to(text, MAX_CELL)


def differing_params(rows: list[dict]) -> list[str]:
    """Params whose value is not the same in every row, in params.yaml's order."""
    keys = list(dict.fromkeys(key for row in rows for key in row["params"]))
    return [key for key in keys if len({json.dumps(row["params"].get(key), sort_keys=True) for row in rows}) > 1]


def short_names(keys: list[str]) -> dict[str, str]:
    """train.lr -> lr, unless another section has an `lr` too."""
    tails = [key.split(".", 1)[-1] for key in keys]
    return {key: tail if tails.count(tail) == 1 else key for key, tail in zip(keys, tails)}


def table(rows: list[dict], width: int) -> str:
    """The experiments, their metrics, then as many differing params as fit `width`; the rest named below."""
    metrics = [(key, title) for key, title in METRICS if any(key in row["metrics"] for row in rows)]
    columns = [("Experiment", [cut_to(row["name"], MAX_NAME) for row in rows]),
               ("Created", [row["created"][5:16].replace("T", " ") for row in rows])]
    columns += [(title, [cell(row["metrics"].get(key, "-")) for row in rows]) for key, title in metrics]
    params = differing_params(rows)
    names = short_names(params)
    left_out = []

    def column_width(title: str, values: list[str]) -> int:
        return max(display_width(title), *map(display_width, values))

    used = sum(column_width(*column) for column in columns) + len(SEPARATOR) * (len(columns) - 1)
    headline = used
    for key in params:
        values = [cell(row["params"].get(key, "-")) for row in rows]
        if used + len(SEPARATOR) + column_width(names[key], values) > width:
            left_out.append(key)
            continue
        columns.append((names[key], values))
        used += len(SEPARATOR) + column_width(names[key], values)
    widths = [column_width(*column) for column in columns]
    lines = [SEPARATOR.join(pad(title, w) for (title, _), w in zip(columns, widths)).rstrip()]
    lines.append(SEPARATOR.join("-" * w for w in widths))
    for index in range(len(rows)):
        lines.append(SEPARATOR.join(pad(values[index], w) for (_, values), w in zip(columns, widths)).rstrip())
    lines = [clip(line, width) for line in lines]
    if headline > width:
        lines.append(f"The headline metrics need {headline} columns and {width} are shown: widen the terminal or "
                     f"pass --width {headline}")
    if not params:
        lines.append("(the runs have the same params)")
    if left_out:
        lines.append(f"{len(left_out)} more param(s) differ, left out to fit {width} columns: "
                     f"{', '.join(left_out)} (--width to widen)")
    return "\n".join(lines)


def correctness(rev: str) -> dict[str, bool] | None:
    """Per test image id, whether the run at git revision `rev` got it right; None when it kept no predictions."""
    shown = subprocess.run(["git", "show", f"{rev}:{PREDICTIONS_CSV.as_posix()}"], capture_output=True, text=True)
    if shown.returncode:
        return None
    return correct_by_id(list(csv.DictReader(io.StringIO(shown.stdout))))


def noise_lines(rows: list[dict], predictions: dict[str, dict[str, bool] | None], width: int) -> list[str]:
    """The best run's top-1 with its 95% interval, then every other run paired with it on the same test images,
    wrapped to `width` columns."""
    have = [row for row in rows if predictions.get(row["name"])]
    if len(have) < 2:
        return []
    best = max(have, key=lambda row: row["metrics"].get("top1", 0))
    reference = predictions[best["name"]]
    low, high = wilson_interval(sum(reference.values()), len(reference))
    lines = [f"Within noise? Each run against the best, {best['name']} (top-1 95% interval {low:.2%}-{high:.2%} on "
             f"{len(reference):,} test images), by an exact McNemar test on the same images:"]
    for row in have:
        if row is best:
            continue
        other = predictions[row["name"]]
        if other.keys() != reference.keys():
            lines.append(f"  {row['name']}: other test images than {best['name']}'s: not comparable")
            continue
        ids = sorted(reference)
        pair = paired([other[i] for i in ids], [reference[i] for i in ids])
        verdict = "beyond noise" if pair.beyond_noise else "within noise"
        needed = images_for_significance(pair) if not pair.beyond_noise else None
        lines.append(f"  {row['name']}: {points(pair.difference)} ({pair.only_first_right} images right only here, "
                     f"{pair.only_second_right} only in {best['name']}), p = {pair.p_value:.2g}: {verdict}"
                     + (f"; a difference like this needs about {needed:,} test images" if needed else ""))
    return [wrapped for line in lines for wrapped in textwrap.wrap(
        line, width, subsequent_indent="    " if line.startswith("  ") else "  ")]


def show_experiments(rev: str | None, all_commits: bool = False) -> list[dict]:
    command = ["dvc", "exp", "show", "--json", *(["--rev", rev] if rev else []),
               *(["--all-commits"] if all_commits else [])]
    try:
        shown = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise StageError("dvc not found: activate the project's environment (. .venv/bin/activate)") from None
    except subprocess.CalledProcessError as error:
        raise StageError(f"`{' '.join(command)}` failed: {error.stderr.strip().splitlines()[-1:]}") from None
    return json.loads(shown or "[]")


def use_plain_ellipsis_if_needed() -> None:
    """An ASCII or Latin-1 terminal (PYTHONIOENCODING, LANG=C) cannot print "…": "..." instead; any other
    character it cannot print is replaced rather than ending the command in a traceback."""
    global ELLIPSIS
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "…".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        ELLIPSIS = "..."
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m commands.compare", description=" ".join(
        __doc__.split("\n\n")[0].split()))
    parser.add_argument("--rev", help="the experiments of this commit (default: the current one)")
    parser.add_argument("--all-commits", action="store_true",
                        help="the experiments of every commit (slower: DVC reads the whole history)")
    terminal = shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    parser.add_argument("--width", type=int_at_least(MIN_WIDTH, "columns"), default=max(MIN_WIDTH, terminal),
                        help=f"columns to fit, {MIN_WIDTH} or more (default: the terminal's, else {DEFAULT_WIDTH})")
    args = parser.parse_args(argv)
    use_plain_ellipsis_if_needed()
    rows = runs_of(show_experiments(args.rev, args.all_commits))
    if not rows:
        raise StageError("no experiment with metrics/eval.json yet: run `dvc exp run` (or `dvc repro`) first")
    print(table(rows, args.width))
    predictions = {row["name"]: correctness(row["rev"]) for row in rows if row.get("rev")}
    if lines := noise_lines(rows, predictions, args.width):
        print("\n" + "\n".join(lines))
    sys.stdout.flush()


if __name__ == "__main__":
    run_stage(main)
