"""The whole choice reduce.py makes: at most --captions_per_image best-aligned captions of each image (when asked),
then the methods, with --keep a fraction of all the pairs (not of those left by the captions rule)."""
from __future__ import annotations

from reduction.select import PairFeatures, Selection, SelectOptions, best_captions, select
from settings.reduction import ReductionSettings
from utils.errors import UserError


def options_of(reduction: ReductionSettings, seed: int, progress: bool) -> SelectOptions:
    return SelectOptions(seed=seed, clusters=reduction.clusters, epsilon=reduction.epsilon,
                         filter_fraction=reduction.filter_fraction, progress=progress)


def choose(reduction: ReductionSettings, features: PairFeatures, seed: int, progress: bool = True) -> Selection:
    total, options = len(features.embedding), options_of(reduction, seed, progress)
    if not reduction.captions_per_image:
        return select(reduction.method, reduction.keep, features, options)
    candidates = best_captions(features.alignment, features.image_of_pair, reduction.captions_per_image)
    target = max(1, round(reduction.keep * total))
    if target > len(candidates):
        raise UserError(f"--captions_per_image {reduction.captions_per_image} leaves {len(candidates)} of {total} "
                        f"pairs, fewer than the {target} that --keep {reduction.keep:g} asks for; keep less or allow "
                        f"more captions per image")
    chosen = select(reduction.method, target / len(candidates), features.subset(candidates), options)
    return chosen.mapped(candidates, total)
