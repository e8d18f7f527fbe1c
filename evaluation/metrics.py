"""Image-caption retrieval metrics (Recall@K) for vision-language evaluation.

An evaluation split has ``I`` images and ``T`` captions; every caption belongs to
exactly one image (``txt2img[t]`` is the image of caption ``t``) and every image
has at least one caption (usually 5, but the count may vary).  Given a
similarity matrix ``scores`` of shape ``[I, T]`` (higher = more similar):

* **TR@K** (text retrieval, image -> text, keys ``txt_r{K}``): percentage of
  images for which *any* of their captions ranks within the top ``K`` of all
  ``T`` captions in that image's row.
* **IR@K** (image retrieval, text -> image, keys ``img_r{K}``): percentage of
  captions whose image ranks within the top ``K`` of all ``I`` images in that
  caption's column.

Tie-breaking is deterministic and defined as a *stable descending sort*: the
0-based rank of candidate ``j`` in a row ``s`` is::

    rank(j) = #{m : s[m] > s[j]} + #{m : s[m] == s[j] and m < j}

i.e. exactly the position of ``j`` in ``np.argsort(-s, kind="stable")``.
Among equal scores the candidate with the smaller index therefore wins.

Everything is computed with vectorised torch comparisons on the device of
``scores``; the only Python loops are over chunks (slabs of image rows, and
chunks of the rare targets that need an explicit tie-break), which bounds the
peak memory (e.g. COCO 5k: 5000 x 25000). There is no per-row loop and no sort.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

__all__ = [
    "DEFAULT_KS",
    "retrieval_metrics",
    "format_metrics",
    "summarize_runs",
    "format_summary",
    "format_table",
    "table_cells",
    "markdown_table",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)

# With chunk_size=None, image rows are processed in slabs of about this many
# scores (~4 MB of float32 comparison buffer), which keeps the slab in cache.
_AUTO_CHUNK_ELEMENTS = 2**20


def _validate_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if len(ks) == 0:
        raise ValueError("ks must contain at least one K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every K in ks must be a positive int, got {k!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not contain duplicates, got {ks}")
    return ks


def _validate_inputs(scores: torch.Tensor, txt2img: torch.Tensor) -> torch.Tensor:
    """Check ``scores``/``txt2img`` and return ``txt2img`` as long on ``scores.device``."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not isinstance(txt2img, torch.Tensor):
        raise ValueError(f"txt2img must be a torch.Tensor, got {type(txt2img).__name__}")
    if scores.dim() != 2:
        raise ValueError(
            f"scores must be 2-D [num_images, num_captions], got shape {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise ValueError(f"scores must have a floating-point dtype, got {scores.dtype}")
    num_images, num_captions = scores.shape
    if num_images == 0:
        raise ValueError("scores has no images (shape[0] == 0)")
    if txt2img.dim() != 1:
        raise ValueError(f"txt2img must be 1-D [num_captions], got shape {tuple(txt2img.shape)}")
    if txt2img.dtype == torch.bool or txt2img.is_floating_point() or txt2img.is_complex():
        raise ValueError(f"txt2img must have an integer dtype (long), got {txt2img.dtype}")
    if txt2img.numel() != num_captions:
        raise ValueError(
            f"txt2img has length {txt2img.numel()} but scores has {num_captions} captions "
            f"(shape {tuple(scores.shape)})"
        )
    txt2img = txt2img.to(device=scores.device, dtype=torch.long)
    if num_captions > 0:
        lo, hi = int(txt2img.min()), int(txt2img.max())
        if lo < 0 or hi >= num_images:
            raise ValueError(
                f"txt2img indices must lie in [0, {num_images - 1}], got min {lo} and max {hi}"
            )
    counts = torch.bincount(txt2img, minlength=num_images)
    no_caption = torch.nonzero(counts == 0).flatten()
    if no_caption.numel() > 0:
        shown = no_caption[:10].tolist()
        more = "" if no_caption.numel() <= 10 else ", ..."
        raise ValueError(
            f"{no_caption.numel()} image(s) have no caption, e.g. image(s) "
            f"{', '.join(map(str, shown))}{more}"
        )
    # max() propagates NaN and is far cheaper than materialising isnan(scores).
    if bool(torch.isnan(scores.amax())):
        raise ValueError("scores contains NaN")
    return txt2img


def _best_caption_per_image(
    scores: torch.Tensor, txt2img: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find, for every image, the ground-truth caption that ranks best in its row.

    The stable-descending order is a strict total order on (score desc, index
    asc), and the rank is the position in that order, so the minimum rank over
    an image's captions is the rank of the caption that comes first in the
    order: the one with the highest score, the lowest index among equal
    scores. Locating it costs O(T) and lets TR rank one candidate per image
    (an [I, T] comparison) instead of every caption (a [T, T] comparison).

    Returns:
        ``gt_score`` ``[T]`` (score of each caption with its own image),
        ``best_score`` ``[I]`` and ``best_caption`` ``[I]`` (long).
    """
    num_images, num_captions = scores.shape
    caption_idx = torch.arange(num_captions, device=scores.device)
    gt_score = scores[txt2img, caption_idx]  # [T]
    # Every image has >= 1 caption, so include_self=False leaves nothing uninitialised.
    best_score = scores.new_empty(num_images).scatter_reduce_(
        0, txt2img, gt_score, reduce="amax", include_self=False
    )
    is_best = gt_score == best_score[txt2img]
    candidates = torch.where(is_best, caption_idx, torch.full_like(caption_idx, num_captions))
    best_caption = torch.full(
        (num_images,), num_captions, dtype=torch.long, device=scores.device
    ).scatter_reduce_(0, txt2img, candidates, reduce="amin")
    return gt_score, best_score, best_caption


def _work_dtype(scores: torch.Tensor) -> torch.dtype:
    """Float dtype for the 0/1 comparison buffers and their sums.

    Comparisons are written as 0.0/1.0 into a float buffer (much faster than
    bool masks on CPU) and summed; every partial sum is an integer <= max(I, T),
    so the sums are exact while that is below 2**24 (float32) or 2**53 (float64).
    Scores in a narrower float dtype are widened exactly to float32 per chunk.
    """
    if scores.dtype == torch.float64 or max(scores.shape) >= 2**24:
        return torch.float64
    return torch.float32


def _ranks(
    scores: torch.Tensor, txt2img: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks under the stable descending order (see module docstring).

    Returns:
        ``txt_rank`` ``[I]`` (long): best rank of an image's captions in its row;
        ``img_rank`` ``[T]`` (long): rank of a caption's image in its column.

    A single pass over contiguous slabs of ``chunk_size`` image rows serves both
    directions (``scores`` is never transposed): for each target score ``s``
    it counts the candidates with a score ``> s`` and ``>= s``. If these differ
    by exactly one (the target itself), nothing ties with the target and the
    rank is the ``> s`` count. Only the targets with extra ties (rare for real
    valued scores) get the exact index-based tie-break afterwards.
    """
    num_images, num_captions = scores.shape
    device = scores.device
    work_dtype = _work_dtype(scores)
    gt_score, best_score, best_caption = _best_caption_per_image(scores, txt2img)
    gt_target = gt_score.to(work_dtype)  # [T], compared along each slab row
    best_target = best_score.to(work_dtype).unsqueeze(1)  # [I, 1]

    # Counts of candidates strictly above / at-or-above each target.
    txt_above = torch.empty(num_images, dtype=work_dtype, device=device)
    txt_not_below = torch.empty(num_images, dtype=work_dtype, device=device)
    img_above = torch.zeros(num_captions, dtype=work_dtype, device=device)
    img_not_below = torch.zeros(num_captions, dtype=work_dtype, device=device)
    buffer = torch.empty(min(chunk_size, num_images), num_captions, dtype=work_dtype, device=device)
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        slab = scores[start:stop].to(work_dtype)  # [C, T]; a view unless widened
        mask = buffer[: stop - start]
        target = best_target[start:stop]
        # Image -> text: each image's best ground-truth caption within its row.
        txt_above[start:stop] = torch.gt(slab, target, out=mask).sum(dim=1)
        txt_not_below[start:stop] = torch.ge(slab, target, out=mask).sum(dim=1)
        # Text -> image: images of this slab above each caption's own image.
        img_above += torch.gt(slab, gt_target, out=mask).sum(dim=0)
        img_not_below += torch.ge(slab, gt_target, out=mask).sum(dim=0)

    txt_rank = txt_above.long()
    img_rank = img_above.long()
    caption_idx = torch.arange(num_captions, device=device)
    image_idx = torch.arange(num_images, device=device)

    # Exact tie-break (equal score and lower index ranks ahead) where needed.
    tied_images = torch.nonzero(txt_not_below - txt_above > 1).flatten()
    for part in torch.split(tied_images, chunk_size):
        rows = scores.index_select(0, part)  # [n, T]
        target = best_score[part].unsqueeze(1)
        tied_before = (rows == target) & (caption_idx < best_caption[part].unsqueeze(1))
        txt_rank[part] += tied_before.sum(dim=1)

    tied_captions = torch.nonzero(img_not_below - img_above > 1).flatten()
    columns_per_part = max(1, chunk_size * num_captions // num_images)
    for part in torch.split(tied_captions, columns_per_part):
        columns = scores.index_select(1, part)  # [I, n]
        tied_before = (columns == gt_score[part]) & (image_idx.unsqueeze(1) < txt2img[part])
        img_rank[part] += tied_before.sum(dim=0)
    return txt_rank, img_rank


def retrieval_metrics(
    scores: torch.Tensor,
    txt2img: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Image<->text Recall@K for a similarity matrix.

    Args:
        scores: ``[I, T]`` similarities between ``I`` images and ``T`` captions,
            higher = more similar. Any float dtype, any device; the computation
            runs on ``scores.device``. Must not contain NaN (``inf`` is allowed).
        txt2img: ``[T]`` integer (long) tensor, ``txt2img[t]`` = index of the
            image caption ``t`` belongs to. Every image must have >= 1 caption.
        ks: the K values of Recall@K (distinct positive ints).
        chunk_size: number of image rows of ``scores`` processed at once; the
            main temporary is one ``[chunk_size, T]`` float buffer. ``None``
            (default) picks ``max(1, 2**20 // T)`` rows. The result does not
            depend on it.

    Returns:
        Percentages in [0, 100] as Python floats, with keys (for the default ks)
        ``txt_r1, txt_r5, txt_r10`` (TR@K: % of images having *any* of their
        captions in the top K of their row), ``img_r1, img_r5, img_r10`` (IR@K:
        % of captions whose image is in the top K of their column),
        ``txt_r_mean`` / ``img_r_mean`` (mean over ks) and
        ``r_mean = (txt_r_mean + img_r_mean) / 2``. For other ks the keys are
        ``txt_r{k}`` / ``img_r{k}`` and the means are over the given ks.

    Ties:
        Broken deterministically as a STABLE DESCENDING sort: the 0-based rank
        of candidate ``j`` in a row ``s`` is
        ``#(s > s[j]) + #(s == s[j] and index < j)``, i.e. its position in
        ``np.argsort(-s, kind="stable")`` (the lower index wins a tie). A hit
        at K means rank < K; for TR the best rank over the image's captions
        is used.

    Raises:
        ValueError: if ``scores`` is not 2-D (or is empty / not floating-point),
            ``txt2img`` is not a 1-D integer tensor of length ``T``, an index is
            out of ``[0, I)``, an image has no caption, ``scores`` contains NaN,
            or ``ks`` / ``chunk_size`` are invalid.
    """
    ks = _validate_ks(ks)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    txt2img = _validate_inputs(scores, txt2img)
    if chunk_size is None:
        chunk_size = max(1, _AUTO_CHUNK_ELEMENTS // scores.shape[1])

    with torch.no_grad():
        txt_rank, img_rank = _ranks(scores.detach(), txt2img, chunk_size)
        # Hit counts for every K in one tensor -> a single device->host transfer.
        k_tensor = torch.tensor(ks, dtype=torch.long, device=scores.device).unsqueeze(1)
        txt_hits = (txt_rank.unsqueeze(0) < k_tensor).sum(dim=1)
        img_hits = (img_rank.unsqueeze(0) < k_tensor).sum(dim=1)
        txt_hits_list = txt_hits.tolist()
        img_hits_list = img_hits.tolist()

    num_images, num_captions = scores.shape
    metrics: dict[str, float] = {}
    for k, hits in zip(ks, txt_hits_list):
        metrics[f"txt_r{k}"] = 100.0 * hits / num_images
    for k, hits in zip(ks, img_hits_list):
        metrics[f"img_r{k}"] = 100.0 * hits / num_captions
    metrics["txt_r_mean"] = sum(metrics[f"txt_r{k}"] for k in ks) / len(ks)
    metrics["img_r_mean"] = sum(metrics[f"img_r{k}"] for k in ks) / len(ks)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


_RECALL_KEY = re.compile(r"^(img|txt)_r(\d+)$")


def _display_keys(keys: Sequence[str]) -> list[tuple[str, str]]:
    """``(key, label)`` pairs in display order: IR@K..., TR@K..., r_mean.

    K values are taken from the ``img_r{k}`` / ``txt_r{k}`` keys present,
    sorted ascending; the per-direction means are not shown.
    """
    img_ks: list[int] = []
    txt_ks: list[int] = []
    for key in keys:
        match = _RECALL_KEY.match(key)
        if match:
            (img_ks if match.group(1) == "img" else txt_ks).append(int(match.group(2)))
    pairs = [(f"img_r{k}", f"IR@{k}") for k in sorted(img_ks)]
    pairs += [(f"txt_r{k}", f"TR@{k}") for k in sorted(txt_ks)]
    if "r_mean" in keys:
        pairs.append(("r_mean", "r_mean"))
    return pairs


def format_metrics(metrics: dict[str, float]) -> str:
    """One-line summary, e.g. ``IR@1 12.34 IR@5 ... TR@10 56.78 r_mean 23.45``.

    Order: ``img_r{k}`` (ascending k), ``txt_r{k}`` (ascending k), ``r_mean``;
    values with two decimals. Keys missing from ``metrics`` are skipped.
    """
    return " ".join(f"{label} {metrics[key]:.2f}" for key, label in _display_keys(list(metrics)))


def summarize_runs(runs: Sequence[dict[str, float]]) -> dict[str, dict]:
    """Aggregate the metric dicts of several runs (e.g. several seeds).

    Returns, for every key of the runs (in the first run's order),
    ``{"mean": float, "std": float, "runs": [float, ...]}``. ``std`` is the
    POPULATION standard deviation (``ddof=0``, divide by the number of runs),
    so it is ``0.0`` for a single run.

    Raises:
        ValueError: if ``runs`` is empty or the runs do not share the same keys.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("summarize_runs needs at least one run")
    keys = list(runs[0])
    for i, run in enumerate(runs[1:], start=1):
        if set(run) != set(keys):
            raise ValueError(
                f"run {i} has keys {sorted(run)} but run 0 has keys {sorted(keys)}"
            )
    summary: dict[str, dict] = {}
    for key in keys:
        values = [float(run[key]) for run in runs]
        mean = math.fsum(values) / len(values)
        variance = math.fsum((v - mean) ** 2 for v in values) / len(values)
        summary[key] = {"mean": mean, "std": math.sqrt(variance), "runs": values}
    return summary


def format_summary(summary: dict[str, dict]) -> str:
    """One line like ``IR@1 12.34 ± 0.56 ... r_mean 23.45 ± 0.12`` (same keys/order as
    :func:`format_metrics`)."""
    return " ".join(
        f"{label} {summary[key]['mean']:.2f} ± {summary[key]['std']:.2f}"
        for key, label in _display_keys(list(summary))
    )


def table_cells(rows: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a comparison table: one row per labelled summary (from
    :func:`summarize_runs`), columns IR@K, TR@K, r_mean as ``mean ± std`` (those of the first row)."""
    if not rows:
        raise ValueError("a table needs at least one row")
    columns = _display_keys(list(next(iter(rows.values()))))
    cells = [[label] + [f"{summary[key]['mean']:.2f} ± {summary[key]['std']:.2f}" for key, _ in columns]
             for label, summary in rows.items()]
    return ["set"] + [label for _, label in columns], cells


def format_table(rows: dict[str, dict[str, dict]]) -> str:
    """:func:`table_cells` as aligned plain text."""
    header, cells = table_cells(rows)
    widths = [max(len(line[i]) for line in [header] + cells) for i in range(len(header))]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in cells])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table of the given header and rows (e.g. from :func:`table_cells`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
