"""The evaluation protocol: fresh models trained on a set (synthetic or real), then retrieval."""
from __future__ import annotations

from dataclasses import dataclass

from settings.base import Settings, at_least, pair_count, setting
from utils.cli import UserError
from utils.dsa import check_strategy


@dataclass
class ProtocolSettings(Settings):
    title = "evaluation (train fresh models on the set, then test retrieval)"

    num_eval: int = setting(5, "fresh models per evaluation (mean ± std over them)", check=at_least(1))
    epoch_eval_train: int = setting(50, "epochs each evaluation model trains", check=at_least(1))
    eval_batch: int = setting(64, "batch size when training evaluation models (a set smaller than it is one batch "
                                          "per epoch)", aliases=("batch_train",), check=pair_count)
    dsa: bool = setting(False, "differentiable augmentation of synthetic images in student steps and evaluation "
                               "training (the reference parses --dsa but never applies it; off by default as there)")
    dsa_strategy: str = setting("color_crop_cutout_flip_scale_rotate", "DSA operations, joined by _")

    @property
    def augmentation(self) -> str | None:
        """The DSA strategy applied to set images, or None."""
        return self.dsa_strategy if self.dsa else None

    def check(self) -> None:
        if self.dsa:
            try:
                check_strategy(self.dsa_strategy)
            except ValueError as err:
                raise UserError(f"--dsa_strategy {self.dsa_strategy!r} (with --dsa True): {err}; or pass "
                                f"--dsa False") from None
