"""Seconds and peak memory of the data-reduction selection methods on a synthetic set of millions of pairs.

    python -m bench.bench_reduce_scale --pairs 1000000 [--dim 256] [--keep 0.25] [--clusters 1000]
        [--methods random alignment prototype_hard semdedup balanced semdedup+balanced] [--work_dir DIR] [--json OUT]

The feature set is generated chunk by chunk into memory-mapped .npy files (embedding [pairs, dim] float32 and an
alignment score per pair): rows scattered around --centres random unit centres, with a --duplicates share of
near-copies of earlier rows (cosine about 0.999, which semdedup's default epsilon removes). With --work_dir the
files are kept there and reused by a later run with the same shape; without it they go to a temporary folder
that is removed at the end. Each method runs in a fresh process of this module, so that its peak resident
memory (VmHWM, which counts the pages of the memory-mapped file it read) is its own.

The target the benchmark checks: semdedup+balanced at 1,000,000 pairs within 10 minutes and 8 GiB on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.peak_memory import peak_rss_mb
from reduction.select import PairFeatures, SelectOptions, select

DEFAULT_METHODS = ["random", "alignment", "prototype_hard", "semdedup", "balanced", "semdedup+balanced"]
TARGET_SECONDS, TARGET_GIB = 600, 8.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000, help="rows of the synthetic feature set")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--centres", type=int, default=2000, help="random centres the rows scatter around")
    parser.add_argument("--duplicates", type=float, default=0.05, help="share of rows that are near-copies")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="methods or combinations (a+b)")
    parser.add_argument("--keep", type=float, default=0.25, help="fraction of the pairs to keep")
    parser.add_argument("--clusters", type=int, default=1000, help="k of k-means")
    parser.add_argument("--epsilon", type=float, default=0.05, help="semdedup's duplicate threshold 1 - epsilon")
    parser.add_argument("--sample", type=int, default=None, help="rows k-means trains on (default max(256 k, 1e5))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=None, help="where the generated .npy files go and are reused")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the numbers to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    return parser.parse_args(argv)


def generate(folder: Path, pairs: int, dim: int, centres: int, duplicates: float, seed: int,
             chunk: int = 65536) -> tuple[Path, Path]:
    """Write embedding.npy and alignment.npy into `folder` (reused when meta.json says they match)."""
    meta = {"pairs": pairs, "dim": dim, "centres": centres, "duplicates": duplicates, "seed": seed}
    paths = folder / "embedding.npy", folder / "alignment.npy"
    meta_path = folder / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta and all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centre_rows = rng.standard_normal((centres, dim)).astype(np.float32)
    centre_rows /= np.linalg.norm(centre_rows, axis=1, keepdims=True)
    embedding = np.lib.format.open_memmap(paths[0], mode="w+", dtype=np.float32, shape=(pairs, dim))
    alignment = np.lib.format.open_memmap(paths[1], mode="w+", dtype=np.float32, shape=(pairs,))
    noise = np.float32(1 / math.sqrt(dim))  # noise of norm about 1: cosine about 0.7 to the centre
    for start in range(0, pairs, chunk):
        stop = min(pairs, start + chunk)
        size = stop - start
        rows = centre_rows[rng.integers(0, centres, size)] + noise * rng.standard_normal((size, dim), np.float32)
        copies = np.flatnonzero(rng.random(size) < duplicates)
        copies = copies[copies > 0]
        originals = (rng.random(len(copies)) * copies).astype(np.int64)  # an earlier row of the chunk
        rows[copies] = rows[originals] + 0.05 * noise * rng.standard_normal((len(copies), dim), np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        embedding[start:stop] = rows
        alignment[start:stop] = 0.3 + 0.05 * rng.standard_normal(size, np.float32)
    embedding.flush()
    alignment.flush()
    del embedding, alignment
    meta_path.write_text(json.dumps(meta))
    return paths


def worker(args: argparse.Namespace) -> None:
    """Run one method on the generated files (in this fresh process) and print its numbers as one JSON line."""
    folder = Path(args.work_dir)
    features = PairFeatures(np.load(folder / "embedding.npy", mmap_mode="r"),
                            alignment=np.load(folder / "alignment.npy", mmap_mode="r"))
    options = SelectOptions(seed=args.seed, clusters=args.clusters, epsilon=args.epsilon, sample=args.sample)
    started = time.perf_counter()
    chosen = select(args.worker, args.keep, features, options)
    seconds = time.perf_counter() - started
    print(json.dumps({"method": args.worker, "seconds": round(seconds, 2), "peak_rss_mib": round(peak_rss_mb(), 1),
                      "kept": int(len(chosen.kept)), "stages": chosen.stages}))


def run_method(method: str, args: argparse.Namespace, folder: Path) -> dict:
    """The numbers of one method, measured in a fresh process of this module."""
    flags = ["--worker", method, "--work_dir", str(folder), "--keep", str(args.keep), "--clusters",
             str(args.clusters), "--epsilon", str(args.epsilon), "--seed", str(args.seed)]
    if args.sample is not None:
        flags += ["--sample", str(args.sample)]
    done = subprocess.run([sys.executable, "-m", "bench.bench_reduce_scale", *flags], capture_output=True, text=True)
    if done.returncode != 0:
        return {"method": method, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def extrapolate(result: dict, pairs: int, to: int) -> tuple[float, float]:
    """Seconds at `to` pairs: (k-means training constant and every other part linear in N; the same but with
    semdedup's within-cluster part growing with the square of the cluster size, i.e. at a fixed k)."""
    scale = to / pairs
    linear = quadratic = 0.0
    for stage in result["stages"]:
        train = stage.get("train_seconds", 0.0)
        linear += train + (stage["seconds"] - train) * scale
        if stage["method"] == "semdedup":
            quadratic += (stage["seconds"] - stage.get("cluster_seconds", 0.0)) * (scale ** 2 - scale)
    return linear, linear + quadratic


def report(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{args.pairs:,} pairs x {args.dim} float32, keep {args.keep}, {args.clusters} clusters "
          f"(wall times: other work on the machine makes them longer)\n")
    print(f"| {'method':<20} | {'seconds':>8} | {'of which k-means':>16} | {'peak RSS MiB':>12} | {'kept':>9} |"
          f" {'10 M s (lin / sq)':>19} | {'100 M s (lin / sq)':>20} |")
    print("(the last two columns keep the clusters at --clusters for every N: lin counts semdedup's pass as linear,\n"
          " sq as quadratic in the cluster size; docs/reduction.md has the arithmetic with k grown to about sqrt(N))")
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 18}|{'-' * 14}|{'-' * 11}|{'-' * 21}|{'-' * 22}|")
    for r in results:
        if "error" in r:
            print(f"| {r['method']:<20} | error: {r['error']}")
            continue
        kmeans = sum(s.get("cluster_seconds", 0) for s in r["stages"])
        ten, hundred = (extrapolate(r, args.pairs, to) for to in (10_000_000, 100_000_000))
        print(f"| {r['method']:<20} | {r['seconds']:>8.1f} | {kmeans:>16.1f} | {r['peak_rss_mib']:>12.0f} |"
              f" {r['kept']:>9,} | {ten[0]:>8.0f} / {ten[1]:>8.0f} | {hundred[0]:>9.0f} / {hundred[1]:>8.0f} |")
    print("""
How it scales (lin: k-means training constant, the rest linear in N; sq: the same, but semdedup's
within-cluster part quadratic in the cluster size, i.e. k fixed):
- random, alignment: linear (a sort of N scores).
- k-means training runs on a fixed sample (max(256 k, 100,000) rows): constant in N once N is above the
  sample (extrapolate from a run with N >= 256 k); assigning every row to
  its nearest of k centroids is linear in N (and in k); reading the memory-mapped file is linear in N.
- semdedup's within-cluster greedy compares each pair with the kept pairs of its cluster: the sum of squared
  cluster sizes. With k fixed that grows as N^2 / k ("sq"); with k grown in proportion to N (fixed cluster size)
  it stays linear ("lin"), at the price of an assignment that grows as N k.
- balanced: a sort of N alignments, clustering as above, then linear quotas and draws.
- peak memory: the touched pages of the memory-mapped embedding (N x dim x 4 bytes) plus O(N) index arrays
  and O(sample x dim) for k-means.""")
    combo = next((r for r in results if r.get("method") == "semdedup+balanced" and "error" not in r), None)
    if combo is not None:
        within = combo["seconds"] <= TARGET_SECONDS and combo["peak_rss_mib"] <= TARGET_GIB * 1024
        print(f"\nsemdedup+balanced: {combo['seconds']:.0f} s, {combo['peak_rss_mib'] / 1024:.2f} GiB peak: "
              f"{'within' if within else 'OUTSIDE'} the target ({TARGET_SECONDS} s, {TARGET_GIB:g} GiB)")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    folder = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="reduce_scale_"))
    try:
        started = time.perf_counter()
        generate(folder, args.pairs, args.dim, args.centres, args.duplicates, args.seed)
        print(f"feature set ready in {folder} ({time.perf_counter() - started:.0f} s)")
        results = []
        for method in args.methods:
            results.append(run_method(method, args, folder))
            print(json.dumps(results[-1]), flush=True)
        report(results, args)
        if args.json:
            Path(args.json).write_text(json.dumps({"pairs": args.pairs, "dim": args.dim, "keep": args.keep,
                                                   "clusters": args.clusters, "results": results}, indent=2))
    finally:
        if not args.work_dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
