"""`python -m benchmarks.scale`: fetch + prepare wall time and peak memory at N and 10N images.

Generates folders of Stanford-Cars-sized JPEGs (benchmarks.speed.cars_like_jpegs: photo-like, 609x406 on
average), runs `python -m stages.fetch` and `python -m stages.prepare` on each exactly as DVC would, and samples
the memory of the stage's whole process tree (the stage and its decode processes) every 50 ms, as PSS
(proportional set size: a page shared by forked processes counts once, split between them, where summing
RSS would count it in every process). Reported per stage: wall time, images/s, peak PSS of the tree, and
peak anonymous PSS (less memory-mapped file pages, which the kernel can drop at will: Arrow files are read
memory-mapped). Then the growth from N to 10N: memory should stay flat (target: within 1.3x), time should
grow ~10x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from benchmarks.speed import cars_like_jpegs

REPO = Path(__file__).resolve().parents[1]
CLASSES = 20
TEST_SHARE = 0.2
CHUNK = 250  # images generated at a time (the generator holds them in memory)


def write_image_folder(root: Path, count: int) -> int:
    """`count` JPEGs in root/{train,test}/class NNN/; returns their total bytes."""
    total, index = 0, 0
    while index < count:
        for encoded in cars_like_jpegs(min(CHUNK, count - index), seed=index):
            split = "test" if (index // CLASSES) % round(1 / TEST_SHARE) == 0 else "train"
            folder = root / split / f"class {index % CLASSES:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:06d}.jpg").write_bytes(encoded)
            total += len(encoded)
            index += 1
    return total


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """(PSS, anonymous PSS) summed over the process and its descendants, in bytes (Linux smaps_rollup)."""
    pss = anon = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            rollup = Path(f"/proc/{member.pid}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in rollup.splitlines()[1:] if ":" in line)
        pss += int(fields.get("Pss", "0 kB").split()[0]) * 1024
        anon += int(fields.get("Pss_Anon", "0 kB").split()[0]) * 1024
    return pss, anon


def run_measured(stage: str, workdir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=workdir, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watched = psutil.Process(child.pid)
    peak_pss = peak_anon = 0
    while child.poll() is None:
        try:
            pss, anon = tree_memory(watched)
        except psutil.NoSuchProcess:
            break
        peak_pss, peak_anon = max(peak_pss, pss), max(peak_anon, anon)
        time.sleep(0.05)
    output = child.communicate()[0].decode(errors="replace")
    if child.returncode != 0:
        sys.exit(f"error: {stage} failed:\n{output[-3000:]}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_pss_mb": round(peak_pss / 2**20),
            "peak_anon_pss_mb": round(peak_anon / 2**20)}


def measure(count: int, workdir: Path, workers: int) -> dict:
    images, marker = workdir / "images", workdir / "images.json"
    if marker.is_file() and json.loads(marker.read_text())["images"] == count:  # --workdir kept from a run before
        source_bytes = json.loads(marker.read_text())["bytes"]
    else:
        shutil.rmtree(images, ignore_errors=True)
        source_bytes = write_image_folder(images, count)
        marker.write_text(json.dumps({"images": count, "bytes": source_bytes}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(preset="none", source=str(images), val_fraction=0.0, test_fraction=0.0)
    params["prepare"]["num_workers"] = workers
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = {"images": count, "source_mb": round(source_bytes / 2**20)}
    for stage in ("fetch", "prepare"):
        result[stage] = run_measured(stage, workdir)
        result[stage]["images_per_s"] = round(count / result[stage]["seconds"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000], help="image counts (N 10N)")
    parser.add_argument("--workers", type=int, default=0, help="prepare.num_workers (0: one per core)")
    parser.add_argument("--workdir", type=Path, help="keep the generated data here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "scale.json")
    args = parser.parse_args()
    base = args.workdir or Path(tempfile.mkdtemp(prefix="scale-"))
    results = []
    try:
        for count in args.counts:
            workdir = base / f"n{count}"
            workdir.mkdir(parents=True, exist_ok=True)
            for output in ("data", "metrics"):
                shutil.rmtree(workdir / output, ignore_errors=True)
            results.append(measure(count, workdir, args.workers))
            r = results[-1]
            print(f"{count:>7} images ({r['source_mb']} MB): " + "; ".join(
                f"{stage} {r[stage]['seconds']} s ({r[stage]['images_per_s']} img/s), peak PSS "
                f"{r[stage]['peak_pss_mb']} MB (anonymous {r[stage]['peak_anon_pss_mb']} MB)"
                for stage in ("fetch", "prepare")), flush=True)
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        scale = last["images"] / first["images"]
        for stage in ("fetch", "prepare"):
            time_growth = last[stage]["seconds"] / first[stage]["seconds"]
            print(f"{stage}: {scale:g}x the images -> {time_growth:.2f}x the time, "
                  f"{last[stage]['peak_pss_mb'] / first[stage]['peak_pss_mb']:.2f}x the peak PSS, "
                  f"{last[stage]['peak_anon_pss_mb'] / first[stage]['peak_anon_pss_mb']:.2f}x the anonymous PSS")
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
