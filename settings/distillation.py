"""Trajectory matching (distill.py): the synthetic set, its optimisers, the matching, what is saved."""
from __future__ import annotations

from dataclasses import dataclass

from settings.base import (DATA_LR_MAX, WEIGHT_LR_MAX, Settings, a_path, at_least, each, in_interval, non_negative,
                           one_of, pair_count, positive, positive_up_to, setting)
from settings.choices import ENCODER_SCHEDULES, IMAGE_ENCODERS, MATCHING_MODES, PIX_INITS, SIM_TYPES, TXT_INITS
from utils.cli import UserError


@dataclass
class DistillSettings(Settings):
    title = "trajectory matching"

    buffer_path: str = setting("./buffers", "buffer root (dataset/image_encoder/text_encoder is appended) or the "
                                            "folder of the files", check=a_path)
    syn_steps: int = setting(20, "student SGD steps per iteration", check=at_least(1))
    matching: str = setting("unroll", "how the meta-gradient is computed: unroll = one graph through all student "
                                      "steps (the reference; memory grows with --syn_steps); exact_lowmem = the same "
                                      "gradient by a reverse sweep that rebuilds one step at a time (memory flat in "
                                      "--syn_steps, somewhat slower); tesla = TESLA/LoRS's approximation: that sweep "
                                      "without the Hessian terms", choices=MATCHING_MODES)
    trajectories_per_iteration: int = setting(1, "expert trajectory segments each process draws per iteration; their "
                                                 "meta-gradients are averaged into one update (under torchrun, the K "
                                                 "processes' too: K x this segments per update)", check=at_least(1))
    sync_check_it: int = setting(20, "under torchrun, compare a checksum of every process's learned state every "
                                     "this many iterations (they must stay identical; a clear error if not)",
                                 check=at_least(1))
    extra_image_encoders: list[str] | None = setting(
        None, "distil for several image encoders: also match the experts of these (each in its own folder beside "
              "--image_encoder's, <buffer_path>/<dataset>/<encoder>/<text_encoder>, trained with the same settings "
              "but the encoder); the pixels are shared (kept in --image_encoder's normalisation, renormalised for "
              "each encoder), the texts and step sizes too; evaluations use --image_encoder",
        check=each(one_of(IMAGE_ENCODERS)), metavar="ENCODER")
    encoder_schedule: str = setting("cycle", "with --extra_image_encoders: cycle = each segment is one encoder's, "
                                             "in turn over the iterations (the cost of one encoder); mean = each "
                                             "segment's meta-gradient is the mean over every encoder's segment (the "
                                             "cost of all of them)", choices=ENCODER_SCHEDULES)
    expert_epochs: int = setting(3, "expert epochs between start and target", check=at_least(1))
    max_start_epoch: int = setting(25, "start epoch is drawn from 0..max_start_epoch-1", check=at_least(1))
    num_pairs: int = setting(100, "synthetic pairs N", aliases=("num_queries",), check=pair_count)
    mini_batch_size: int = setting(100, "synthetic pairs per student step", check=pair_count)
    iterations: int = setting(50000, "distillation iterations", aliases=("Iteration",), check=at_least(1))
    lr_img: float = setting(1000, "learning rate of the synthetic images", check=positive_up_to(DATA_LR_MAX))
    lr_txt: float = setting(1000, "learning rate of the synthetic text embeddings",
                            check=positive_up_to(DATA_LR_MAX))
    lr_lr: float = setting(1e-3, "learning rate of the two learned step sizes",
                           check=positive_up_to(WEIGHT_LR_MAX))
    student_lr_img: float = setting(0.1, "initial value of the learned student step size of the image side",
                                    aliases=("lr_teacher_img",), check=positive_up_to(WEIGHT_LR_MAX))
    student_lr_txt: float = setting(0.1, "initial value of the learned student step size of the text head",
                                    aliases=("lr_teacher_txt",), check=positive_up_to(WEIGHT_LR_MAX))
    pix_init: str = setting("real", "synthetic image initialisation: real = random training images through the "
                                    "training augmentation (the reference), clean = the same without augmentation, "
                                    "kmeans = the k-means coreset (the real pair nearest to each of N centroids of the "
                                    "joint image+text features: the frozen trunk's, else the first expert's), noise = "
                                    "Gaussian", choices=PIX_INITS)
    txt_init: str = setting("real", "synthetic text initialisation", choices=TXT_INITS)
    sim_type: str = setting("none", "LoRS: learn the target similarity between synthetic images and texts: none = "
                                    "identity (the paper), full = an N x N matrix, lowrank = diag(a) + (sim_alpha / "
                                    "sim_rank) L R^T; saved with the set and used by evaluate.py", choices=SIM_TYPES)
    sim_rank: int = setting(10, "rank r of the low-rank similarity", check=at_least(1))
    sim_alpha: float = setting(1.0, "scale alpha of the low-rank part", check=positive)
    lr_sim: float = setting(10.0, "learning rate of the similarity (SGD momentum 0.5); 0 keeps S at its start, the "
                                  "identity (the soft-target loss alone)", check=in_interval(0, DATA_LR_MAX))
    blend_alpha: float = setting(0.0, "RepBlend: in every student step blend the minibatch's image and text "
                                      "representations with a shuffled copy, lambda ~ Beta(A, A) (0 = off)",
                                 check=non_negative)
    max_files: int | None = setting(None, "use only this many expert files", check=at_least(1))
    max_experts: int | None = setting(None, "use only this many experts per file", check=at_least(1))
    skip_spikes: float = setting(10.0, "skip (and count) a step whose meta-gradient norm, for the pixels, texts, step "
                                       "sizes or similarity, exceeds this many times its median over the last 20 "
                                       "applied steps (0 = never skip a finite step); non-finite steps and steps that "
                                       "would make a step size non-positive are always skipped", check=non_negative)
    max_skips: int = setting(20, "stop (keeping the last good set) after this many skipped steps in a row",
                             check=at_least(1))
    eval_it: int = setting(50, "evaluate and save every this many iterations", check=at_least(1))
    time_budget: float | None = setting(None, "stop after this many minutes (at the end of an iteration), then "
                                              "evaluate and save as at the end of a run; comparisons at equal CPU "
                                              "time", check=positive, metavar="MINUTES")
    draw: bool = setting(True, "save image grids and nearest real captions at each evaluation")
    save_dir: str | None = setting(None, "output folder (default: runs/<dataset>/<name>)", check=a_path)
    resume: str | None = setting(None, "a distilled_*.pt of an earlier run to continue from", check=a_path)
    overwrite: bool = setting(False, "let a run without --resume replace the sets an earlier run left in --save_dir "
                                     "(else refused: continue it with --resume, or give another --save_dir)")

    def check(self) -> None:
        if self.sim_type == "lowrank" and self.sim_rank > self.num_pairs:  # L and R are N x r
            raise UserError(f"--sim_type lowrank: --sim_rank {self.sim_rank} is larger than --num_pairs "
                            f"{self.num_pairs} (the low-rank similarity of N pairs has rank at most N)")
        if self.mini_batch_size > self.num_pairs:
            raise UserError(f"--mini_batch_size {self.mini_batch_size} is larger than --num_pairs {self.num_pairs}")
