"""What reduce.py keeps of a large set of real pairs, and how it chooses (reduction/, docs/reduction.md)."""
from __future__ import annotations

from dataclasses import dataclass

from settings.base import Settings, a_path, at_least, described, in_interval, positive_up_to, setting
from settings.choices import REDUCE_METHODS
from utils.cli import suggestion


def method_problem(value) -> str | None:
    """What is wrong with a method or a combination of methods ("semdedup+balanced"), or None."""
    if value is None:
        return None
    parts = value.split("+")
    for part in parts:
        if part not in REDUCE_METHODS:
            return (f"{part!r} is not a method; choose from {', '.join(REDUCE_METHODS)}, or join several with + "
                    f"(e.g. semdedup+balanced)" + suggestion(part, REDUCE_METHODS))
    if "random" in parts[:-1]:
        return "random can only be the last method of a combination (it filters nothing)"
    return None


check_method = described(method_problem, f"one of {', '.join(REDUCE_METHODS)}, or several joined with +")


@dataclass
class ReductionSettings(Settings):
    title = "reduction"

    method: str = setting("balanced", "how to choose the pairs kept: random; alignment (the best-aligned image-text "
                                      "pairs); prototype_hard / prototype_easy (farthest from / nearest to their "
                                      "k-means centroid); semdedup (drop near-duplicates within each cluster); "
                                      "balanced (TL;DR: the better-aligned part, then the same share of every "
                                      "cluster); density (cluster quotas from how spread each cluster is); or "
                                      "several joined with + (each but the last filters, the last chooses)",
                          check=check_method)
    keep: float | None = setting(None, "fraction of the pairs to keep", check=positive_up_to(1.0))
    out: str | None = setting(None, "where the kept pairs go: an annotation file in the input's layout (JSON data "
                                    "sets), or the list of kept keys per shard (--shards)", check=a_path)
    overwrite: bool = setting(False, "let --out replace an existing file that reduce.py did not write (an input is "
                                     "never replaced)")
    shards: str | None = setting(None, "webdataset tar shards instead of --dataset's annotation files, in brace "
                                       "notation (data/{00000..00099}.tar); each sample {key}.jpg + {key}.txt",
                                 check=a_path)
    features_dir: str | None = setting(None, "where the features of --shards are kept (default: --cache_dir/"
                                             "reduce_features/<digest>); a killed run continues from its finished "
                                             "shards", check=a_path)
    write_shards: str | None = setting(None, "with --shards: also write new shards holding only the kept samples "
                                             "into this folder", check=a_path)
    buffer_path: str | None = setting(None, "experts of buffer.py whose trained image and text heads give the "
                                            "aligned space (alignment and balanced need it; root or the folder "
                                            "of the files); without it pairs are compared by the frozen encoders' "
                                            "own features", check=a_path)
    expert_number: int | None = setting(None, "expert file to use (default: lowest)", check=at_least(0))
    clusters: int = setting(1000, "k-means clusters (prototype_*, semdedup, balanced, density; at most the number "
                                  "of pairs)", check=at_least(1))
    epsilon: float = setting(0.05, "semdedup: a pair is a near-duplicate of a kept one of its cluster when their "
                                   "cosine exceeds 1 - epsilon", check=in_interval(0.0, 1.0))
    filter_fraction: float = setting(0.5, "balanced, and alignment before another method: the better-aligned "
                                          "fraction that stays in (raised to --keep when --keep is larger)",
                                     check=positive_up_to(1.0))
    captions_per_image: int | None = setting(None, "with several captions per image, keep at most this many "
                                                   "best-aligned ones of each image before choosing (needs "
                                                   "--buffer_path)", check=at_least(1))
    report: bool = setting(True, "write OUT.report.json and OUT.report.png (counts, per cluster, the scores)")
