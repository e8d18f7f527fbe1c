"""Training the experts whose trajectories distillation matches (buffer.py)."""
from __future__ import annotations

from dataclasses import dataclass

from settings.base import WEIGHT_LR_MAX, Settings, a_path, at_least, in_interval, pair_count, positive_up_to, setting
from settings.choices import BUFFER_FORMATS


@dataclass
class ExpertSettings(Settings):
    title = "experts"

    buffer_path: str = setting("./buffers", "root folder of the expert buffers", check=a_path)
    buffer_format: str = setting("pt", "layout of the expert files written: pt (img/txt_replay_buffer_<n>.pt pairs, "
                                       "the reference's) or safetensors (expert_<n>.safetensors and "
                                       "buffer_index.json, read memory-mapped); a folder holds one layout",
                                 choices=BUFFER_FORMATS)
    num_experts: int = setting(100, "experts to train (added to those present)", check=at_least(1))
    train_epochs: int = setting(50, "epochs per expert (snapshots = epochs + 1)", check=at_least(1))
    expert_lr_img: float = setting(0.1, "SGD learning rate of the experts' image side", aliases=("lr_teacher_img",),
                                   check=positive_up_to(WEIGHT_LR_MAX))
    expert_lr_txt: float = setting(0.1, "SGD learning rate of the experts' text head", aliases=("lr_teacher_txt",),
                                   check=positive_up_to(WEIGHT_LR_MAX))
    expert_batch: int = setting(128, "training batch size of the experts (real pairs; a training split "
                                                   "smaller than it is one batch per epoch)",
                                aliases=("batch_train", "batch_size_train"), check=pair_count)
    expert_momentum: float = setting(0.0, "SGD momentum of the experts", aliases=("mom",),
                                     check=in_interval(0, 1, high_included=False))
    expert_weight_decay: float = setting(0.0, "SGD weight decay of the experts", aliases=("l2",), check=in_interval(0, 1))
    decay: bool = setting(False, "multiply both learning rates by 0.1 after epoch train_epochs // 2 + 1")
