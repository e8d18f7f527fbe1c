"""What evaluate.py judges and how it chooses (the set, the coreset selection, the learning rate, the split)."""
from __future__ import annotations

from dataclasses import dataclass

from settings.base import WEIGHT_LR_MAX, Settings, a_path, at_least, each, pair_count, positive_up_to, setting
from settings.choices import CENTROIDS, CORESET_METHODS, IMAGE_ENCODERS, TEXT_ENCODERS
from settings.model import MAX_IMAGE_SIZE
from utils.cli import UserError

# The evaluation learning rate of real sets (coresets, full data) when neither --lr_eval nor --lr_grid is given.
DEFAULT_REAL_LR = 0.1


@dataclass
class JudgingSettings(Settings):
    title = "evaluation choices"

    coreset_size: int | None = setting(None, "coreset size N (pairs)", aliases=("num_queries",), check=pair_count)
    lr_eval: float | None = setting(None, "learning rate of the evaluation models, image side and text head (default: "
                                          "the set's learned step sizes, syn_lr_img for the image side and syn_lr_txt "
                                          f"for the text head; for coresets and --full, {DEFAULT_REAL_LR:g})",
                                   check=positive_up_to(WEIGHT_LR_MAX))
    lr_grid: list[float] | None = setting(None, "choose the learning rate from these values on --eval_split (the same "
                                                "budget for every set judged); without it the rate is --lr_eval or the "
                                                "default above", check=each(positive_up_to(WEIGHT_LR_MAX)),
                                          metavar="LR")
    epoch_scales: list[float] | None = setting(None, "choose the number of epochs too, from these multiples of "
                                                     "--epoch_eval_train (rounded, at least 1), jointly with the "
                                                     "learning rate on --eval_split", check=each(positive_up_to(100.0)),
                                               metavar="SCALE")
    widen_grid: int = setting(0, "where the best (learning rate, epochs) sits at an edge of the grid, score up to "
                                 "this many more cells, one step past that edge each", check=at_least(0, 100))
    tune_models: int = setting(1, "models per grid cell (--lr_grid value × --epoch_scales value)", check=at_least(1))
    report_split: str = setting("auto", "split the final numbers are reported on: auto = test when its annotation "
                                        "file exists, else --eval_split", choices=("auto", "val", "test"))
    eval_image_encoder: str | None = setting(None, "train this image encoder instead of the one the set was made "
                                                   "with", choices=IMAGE_ENCODERS)
    eval_image_size: int | None = setting(None, "train at this image size instead of the set's: its pixels are "
                                                "resized (each pixel the mean of the area it covers when smaller, "
                                                "bilinear when larger) and the evaluation images load at this size; "
                                                "only for --distilled (real pairs: --image_size)",
                                          check=at_least(1, MAX_IMAGE_SIZE))
    eval_text_encoder: str | None = setting(None, "embed the captions with this text encoder instead of the one the "
                                                  "set was made with: a distilled set's texts go over as their nearest "
                                                  "real training captions (cosine, in the set's own text space), a "
                                                  "coreset's as its own captions, re-encoded with this encoder",
                                            choices=TEXT_ENCODERS)
    out: str | None = setting(None, "write the metrics and configuration to this JSON file", check=a_path)
    overwrite: bool = setting(False, "let --out replace an existing file that is not an evaluate.py report (a "
                                     "report it wrote before is always replaced)")

    def check(self) -> None:
        if self.lr_grid is not None and self.lr_eval is not None:
            raise UserError("--lr_eval fixes the learning rate, --lr_grid chooses it: give one of them")


@dataclass
class CoresetSettings(Settings):
    title = "coreset selection"

    buffer_path: str = setting("./buffers", "experts that embed pairs for herding / kcenter / kmeans (root or the "
                                            "folder of the files)", check=a_path)
    expert_number: int | None = setting(None, "expert file pair to use (default: lowest)", check=at_least(0))
    expert_epoch: int | None = setting(None, "snapshot of that expert (default: last)", check=at_least(0))
    forgetting_epochs: int = setting(2, "epochs of the expert that counts forgetting (a pair must be seen twice to be "
                                    "forgotten)", check=at_least(2))
    forgetting_batch: int = setting(128, "batch size of that expert", check=pair_count)
    forgetting_lr_img: float = setting(0.1, "image-side learning rate of the forgetting expert",
                                       check=positive_up_to(WEIGHT_LR_MAX))
    forgetting_lr_txt: float = setting(0.1, "text-head learning rate of the forgetting expert",
                                       check=positive_up_to(WEIGHT_LR_MAX))
    coreset_file: str | None = setting(None, "where the selected coreset is saved (default runs/<dataset>/coresets/"
                                             "<method>_<N>_seed<seed>.pt); an existing file made with the same "
                                             "settings is reused", check=a_path)


@dataclass
class TargetSettings(Settings):
    title = "what to evaluate (exactly one)"

    distilled: str | None = setting(None, "a distilled-set (or coreset) .pt file", check=a_path)
    coreset: str | None = setting(None, "select real pairs with this method (centroids: the k-means feature-centroid "
                                        "set)", choices=(*CORESET_METHODS, CENTROIDS))
    full: bool = setting(False, "train on the whole training split")
    subset: str | None = setting(None, "train on the training pairs listed in this annotation file (the training "
                                       "split's layout, e.g. reduce.py's output; each of its pairs must be one of the "
                                       "training split's), as --full does", check=a_path)

    def check(self) -> None:
        given = [f"--{name}" for name in ("distilled", "coreset", "full", "subset") if getattr(self, name)]
        if len(given) != 1:
            raise UserError("give exactly one of --distilled PATH, --coreset METHOD, --full, --subset FILE" +
                            (f" (got {' and '.join(given)})" if given else ""))
