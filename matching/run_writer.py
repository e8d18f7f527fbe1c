"""What a distillation run writes, on rank 0 alone: its sets, the timing record, grids and the log.

`RunWriter.save` writes one `ResumePoint` as a set file (data/distilled_set.py) and the timing record it
owns beside it. `evaluate_and_save` judges the set of a point (the evaluation models shared out over the
processes), writes the best file first when the set improved, then `distilled_<iteration>.pt`, then the
last file, and with --draw the image grids and nearest real captions. The other processes take part in
the evaluation and write nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from data.build import RetrievalData
from data.distilled_set import save_distilled_set
from data.model_inputs import ModelInputs
from evaluation.metrics import format_summary
from evaluation.protocol import evaluate_pairs, lr_label, untrained_warning
from matching.distiller import Distiller
from matching.resume import ResumePoint
from matching.run_files import RunFiles
from matching.timing import RunTiming
from settings.programs import DistillRunSettings
from utils.distributed import ProcessGroupInfo
from utils.seeds import distill_eval_seed
from utils.visualize import nearest_captions, save_image_grids, write_nearest_captions


# A matching iteration's wandb keys, and the reference implementation's names for them, logged as well so
# that plots and scripts made for the reference keep working.
REFERENCE_WANDB_KEYS = {"matching/loss": "Grand_Loss", "matching/image_loss": "img_param_loss",
                        "matching/text_loss": "txt_param_loss", "matching/start_epoch": "Start_Epoch",
                        "synthetic/lr_img": "Synthetic_LR_Image", "synthetic/lr_txt": "Synthetic_LR_Text",
                        "guard/skipped_steps": "Skipped_Steps"}


def wandb_record(stats: dict) -> dict:
    """`stats` under this project's keys and, for those the reference logs, under its keys too."""
    return {**stats, **{REFERENCE_WANDB_KEYS[k]: v for k, v in stats.items() if k in REFERENCE_WANDB_KEYS}}


@dataclass
class RunWriter:
    settings: DistillRunSettings
    files: RunFiles
    config: dict  # the run's configuration, stored in every set
    distiller: Distiller
    timing: RunTiming
    run: object  # the wandb run (utils/wandb_logging.start_run)
    inputs: ModelInputs  # what evaluation models train and are tested on
    data: RetrievalData
    model: torch.nn.Module  # the student model, the evaluation models' template
    group: ProcessGroupInfo
    device: torch.device

    @property
    def main_process(self) -> bool:
        return self.group.is_main

    @property
    def progress(self) -> bool:
        return self.settings.runtime.progress and self.main_process

    def similarity_of(self, learned: dict) -> torch.Tensor | None:
        """The target similarity of a learned state (None: the identity)."""
        similarity = self.distiller.similarity
        return None if similarity is None else similarity.submatrix(learned["sim_params"]).detach()

    def save(self, path: Path, point: ResumePoint) -> None:
        """Write `point` as the set file `path` and the timing record beside it (rank 0; the others write nothing)."""
        if not self.main_process:
            return
        learned, similarity = point.learned, self.similarity_of(point.learned)
        extra = {} if similarity is None else {"similarity": similarity, "sim_params": learned["sim_params"]}
        save_distilled_set(path, learned["image_syn"], learned["text_syn"], learned["syn_lr_img"], learned["syn_lr_txt"],
                           point.iteration, self.config, point.metrics, point.state(), **extra)
        self.timing.write(self.files.dir)

    def evaluate_and_save(self, point: ResumePoint) -> ResumePoint:
        """Judge the set of `point` (the evaluation models shared out over the processes), write it, and return
        the point with its evaluation and the best so far."""
        settings, iteration, learned = self.settings, point.iteration, point.learned
        # The models train at the set's two learned step sizes: the image side at one, the text head at the other.
        lr, lr_txt, untrained = learned["syn_lr_img"], learned["syn_lr_txt"], []
        summary = evaluate_pairs(settings.model, settings.protocol, learned["image_syn"], learned["text_syn"], lr,
                                 self.inputs, self.device, settings.protocol.num_eval,
                                 seed=distill_eval_seed(settings.runtime.seed, iteration), progress=self.progress,
                                 similarity=self.similarity_of(learned), model=self.model, group=self.group,
                                 untrained=untrained, lr_txt=lr_txt)
        if self.main_process:
            tqdm.write(f"iteration {iteration}: {format_summary(summary)}  (eval {lr_label(lr, lr_txt)}, "
                       f"{settings.protocol.num_eval} models, {settings.data.eval_split}; "
                       f"{self.distiller.guard.total_skipped} steps skipped so far)")
            if untrained:
                tqdm.write(untrained_warning(untrained, settings.protocol.num_eval))
        self.run.log({**{f"eval/{k}": v["mean"] for k, v in summary.items()},
                      **{f"eval/{k}_std": v["std"] for k, v in summary.items()}}, step=iteration)
        r_mean = summary["r_mean"]["mean"]
        improved = r_mean > point.best_r_mean
        best = {"best_r_mean": r_mean, "best_iteration": iteration} if improved else {}
        evaluated = replace(point, metrics=summary, **best)
        # The best file first: whichever write a kill interrupts, no file on disk claims a best set that
        # distilled_best.pt does not hold (a resume from the older last file evaluates and writes it again).
        if improved:
            self.save(self.files.best, evaluated)
        self.save(self.files.at(iteration), evaluated)
        self.save(self.files.last, evaluated)
        if settings.distill.draw and self.main_process:
            self.draw(iteration, learned["image_syn"], learned["text_syn"])
        return evaluated

    def draw(self, iteration: int, image_syn: torch.Tensor, text_syn: torch.Tensor) -> None:
        """The image grids and each synthetic text's nearest real captions, as files and in the log."""
        grids = save_image_grids(image_syn, self.files.dir, f"{iteration:06d}")
        nearest = nearest_captions(text_syn, self.data.train_text, self.data.train.captions)
        write_nearest_captions(nearest, self.files.dir / f"nearest_captions_{iteration:06d}.txt")
        if self.settings.runtime.logging_mode != "disabled":
            import wandb
            self.run.log({"Synthetic_Images": wandb.Image(str(grids["plain"])),
                          "Clipped_Synthetic_Images": wandb.Image(str(grids["clipped"])),
                          "Nearest_Captions": wandb.Table(columns=["index", "cosine", "caption"],
                                                          data=[[i, s, c] for i, (c, s) in enumerate(nearest)])},
                         step=iteration)

    def report_step(self, iteration: int, stats: dict, bar) -> None:
        """A matching iteration's statistics: the log, the progress bar, and a line for a skipped step."""
        skipped = stats.pop("skipped")
        if skipped and self.main_process:
            tqdm.write(f"iteration {iteration}: step skipped: {skipped}")
        guard = self.distiller.guard
        self.run.log(wandb_record({**stats, "guard/skipped_steps": guard.total_skipped}), step=iteration)
        bar.set_postfix(loss=f"{stats['matching/loss']:.4f}", lr_img=f"{stats['synthetic/lr_img']:.4g}",
                        lr_txt=f"{stats['synthetic/lr_txt']:.4g}", skipped=guard.total_skipped)

    def finish(self, point: ResumePoint, start_it: int, started: float) -> str:
        """Close the log; the run's closing line (`started`: its time.time() when the iterations began)."""
        self.run.finish()
        guard, files = self.distiller.guard, self.files
        by_reason = ", ".join(f"{n} {k}" for k, n in guard.skipped.items())
        return (f"done: {point.iteration - start_it} iterations in {time.time() - started:.0f}s "
                f"({self.timing.summary()}); {guard.total_skipped} steps skipped{f' ({by_reason})' if by_reason else ''}; "
                f"best r_mean on {self.settings.data.eval_split} {point.best_r_mean:.2f} -> {files.best}; "
                f"last -> {files.last}")
