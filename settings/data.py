"""Which data, where it lives, and how it is loaded (every program)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from settings.base import Computed, Settings, a_path, at_least, setting
from settings.choices import DATASETS, SPLITS


def default_cache_dir() -> str:
    """Where generated data and caches live: $VL_DISTILL_CACHE, else ~/.cache/vl-distill (looked up each time:
    the default of every settings object made)."""
    return os.environ.get("VL_DISTILL_CACHE", str(Path.home() / ".cache" / "vl-distill"))


# Upper ends of counts that each cost a process or a full copy of the data: far above any useful value, low
# enough that a typo (an extra zero or three) is an error before any work, not a machine out of memory or
# processes.
MAX_WORKERS = 64
MAX_FEATURE_VIEWS = 100


@dataclass
class DataSettings(Settings):
    title = "data"

    dataset: str = setting("flickr", "flickr = Flickr30K, coco = COCO (Karpathy split), flickr8k, shapes (embedded, "
                                     "generated on first use, no download), or webdata (webdataset shards unpacked "
                                     "by export.py shards)", choices=DATASETS)
    image_root: str | None = setting(None, "folder the annotation 'image' paths are relative to (shapes: generated "
                                           "in --cache_dir)", check=a_path)
    ann_root: str | None = setting(None, "folder of the annotation JSON files (IMAGE_ROOT/annotations when not given)",
                                   check=a_path)
    eval_split: str = setting("val", "split for the evaluations that make choices (experts' epochs, distillation's "
                                     "best iteration, learning rates); evaluate.py reports final numbers on "
                                     "--report_split (the reference evaluates on test)", choices=SPLITS)
    max_train_images: int | None = setting(None, "train on the first K training images only (with all their "
                                                 "captions): CPU-sized runs", check=at_least(1))
    skip_bad_images: bool = setting(False, "leave out pairs whose image is missing, unreadable, truncated or too large (counted by kind) instead of stopping")
    cache_dir: str = setting(Computed(default_cache_dir), "where the generated shapes data set and the "
                                                          "text-embedding and trunk-output caches live (env "
                                                          "VL_DISTILL_CACHE)", check=a_path)
    feature_views: int = setting(2, "with a frozen trunk (--train_stages K / --image_projection): augmented views "
                                    "cached per training image besides the plain one; training draws one view per "
                                    "pair and epoch (0 = the plain view only, no augmentation); each view is one "
                                    "more copy of the training images' trunk outputs in memory and on disk",
                                check=at_least(0, MAX_FEATURE_VIEWS))
    num_workers: int = setting(2, "data-loading worker processes", check=at_least(0, MAX_WORKERS))
    batch_size_test: int = setting(128, "batch size when embedding evaluation images", check=at_least(1))
