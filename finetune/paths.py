"""Every file the stages exchange, in one place: what each stage reads and writes (dvc.yaml declares the same).

fetch     -> RAW_DIR
prepare   RAW_DIR -> PREPARED_DIR, DATA_METRICS, DROPPED_LIST, DUPLICATES_LIST
check     params.yaml -> PARAMS_CHECK (every other stage depends on it: bad params stop the run before DVC
          deletes any stage's outputs)
probe     PREPARED_DIR -> PROBE_HEAD, PROBE_METRICS, PROBE_REPORT, PROBE_PREDICTIONS
train     PREPARED_DIR, PROBE_HEAD -> MODEL_PATH, LIVE_DIR (and STATE_DIR/train_state-<fingerprint>.pt while a run
          is unfinished: finetune/resume.py names it)
evaluate  MODEL_PATH, PREPARED_DIR -> EVAL_METRICS, EVAL_REPORT, PER_CLASS_CSV, CONFUSED_CSV, PREDICTIONS_CSV,
          CONFUSION_JSON
gradcam   MODEL_PATH, PREPARED_DIR, PER_CLASS_CSV, PREDICTIONS_CSV -> GRADCAM_DIR
report    LIVE_DIR, DATA_METRICS, PROBE_METRICS, PROBE_REPORT, PROBE_PREDICTIONS, EVAL_METRICS, EVAL_REPORT,
          PER_CLASS_CSV, PREDICTIONS_CSV, CONFUSION_JSON, GRADCAM_DIR -> REPORT_DIR
export    MODEL_PATH, PREPARED_DIR -> EXPORT_DIR, EXPORT_METRICS
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the folder of dvc.yaml: what relative paths below are relative to

RAW_DIR = Path("data/raw")
LEFT_OUT_FILES = RAW_DIR / "left_out.json"  # source files fetch did not take, with the reason, for prepare to list

PREPARED_DIR = Path("data/prepared")
DATA_METRICS = Path("metrics/data.json")
DROPPED_LIST = Path("metrics/dropped_images.csv")
DUPLICATES_LIST = Path("metrics/duplicate_images.csv")  # every repeated image: across splits or under two labels

PARAMS_CHECK = Path("metrics/params_check.txt")

PROBE_HEAD = Path("models/probe.pt")  # the fitted probe as a linear head over the pooled features (or why none)
PROBE_METRICS = Path("metrics/probe.json")  # its test top-1 and mean per-class accuracy, beside eval.json's
PROBE_REPORT = Path("metrics/probe_report.json")  # image counts, the C chosen and its held-out scores, timings
PROBE_PREDICTIONS = Path("plots/probe_predictions.csv")  # per test image, as plots/predictions.csv

MODEL_PATH = Path("models/model.pt")
LIVE_DIR = Path("metrics/train")  # DVCLive: metrics.json (summary) and plots/metrics/**.tsv (per epoch)
LIVE_CURVES = LIVE_DIR / "plots" / "metrics"
STATE_DIR = Path("checkpoints")  # train.state_dir's default: the resume state of an unfinished run, not a DVC output

EVAL_METRICS = Path("metrics/eval.json")
EVAL_REPORT = Path("metrics/eval_report.json")
PER_CLASS_CSV = Path("plots/per_class_accuracy.csv")
CONFUSED_CSV = Path("plots/confused_pairs.csv")
PREDICTIONS_CSV = Path("plots/predictions.csv")
CONFUSION_JSON = Path("plots/confusion.json")  # {"class_names": [...], "counts": [[true][predicted]]}

GRADCAM_DIR = Path("plots/gradcam")
REPORT_DIR = Path("plots/report")

EXPORT_DIR = Path("models/export")
EXPORT_METRICS = Path("metrics/export.json")

# Folders whose files are pipeline outputs: `predict --out` may not write into them (nor into train.state_dir).
PIPELINE_OUTPUT_DIRS = (Path("data"), Path("models"), Path("metrics"), Path("plots"), STATE_DIR)
