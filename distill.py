"""Distill a tiny synthetic set of image-text pairs by matching expert trajectories.

State being learned: synthetic images (N×3×H×W normalised pixels), synthetic text embeddings (N×D,
in the frozen text encoder's space) and two step sizes (image encoder, text head). Each iteration
takes an expert trajectory, starts a student at epoch `start` of it, takes --syn_steps SGD steps on
random synthetic minibatches (graph kept), and minimises the distance to the expert's parameters
--expert_epochs later, normalised by how far the expert moved. Every --eval_it iterations fresh
models are trained on the synthetic set (the image side at the learned syn_lr_img, the text head at
syn_lr_txt) and tested; the set is saved to --save_dir then
(distilled_best.pt when it improved, distilled_<it>.pt, distilled_last.pt), and resumable with --resume.
Ctrl-C (or SIGTERM) saves the start of the iteration it interrupted to distilled_last.pt; a resumed run
continues bit for bit as one that never stopped (every random draw comes from saved generators;
evaluations draw from their own seeds). See docs/file-formats.md.

`--trajectories_per_iteration M` averages the meta-gradients of M segments per update; under
`torchrun --nproc_per_node K` every process draws its own M and one all_reduce averages all K x M
(matching/streams.py; README "Many GPUs and machines"). Rank 0 alone writes, prints and logs.
"""
# (The docstring above is --help.) This file parses, builds and loops; the learned state, the resume point
# and what a run writes live in matching/ (README "Architecture").
from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import utils.cli  # noqa: F401 (first: a Ctrl-C while the libraries below load is one line, not a traceback)
import torch
from tqdm import tqdm

from data.build import load_retrieval_data
from data.model_inputs import inputs_for
from evaluation import coreset_files
from evaluation.training import batch_note
from experts.cycler import ExpertCycler
from experts.files import check_buffer_matches, check_data_matches, expected_metadata, locate_buffer, read_metadata
from matching.distiller import Diverged, Distiller
from matching.encoders import EncoderCyclers, arm_model_settings, build_arm, check_extra_encoders
from matching.guard import after_divergence
from matching.resume import ResumePoint, check_ranks_agree, load_resume, resume_point
from matching.run_files import RunFiles, check_run_paths, save_dir_of
from matching.run_writer import RunWriter
from matching.streams import SegmentStream, SegmentStreams
from matching.synthetic import initial_synthetic_set
from matching.timing import RunTiming
from matching.trajectory import Students
from networks import build_model, check_image_size, image_norm, text_encoder_identity
from reparam_module import ReparamModule
from settings import programs
from settings.programs import DistillRunSettings
from utils.cli import UserError, run_cli
from utils.device import pick_device, seed_everything
from utils import distributed
from utils.distributed import ProcessGroupInfo
from utils.seeds import segment_stream_seed
from utils.wandb_logging import start_run


def parse_args(argv=None) -> DistillRunSettings:
    return programs.parse("distill", __doc__, argv)


def run_config(settings: DistillRunSettings, text_identity: str) -> dict:
    """The run's settings (one key per flag) and what they resolved to, stored in every saved set."""
    config = settings.flat_config()
    config["text_identity"] = text_identity
    config["source"] = "distilled"
    config["image_norm"] = image_norm(settings.model)
    return config


def kmeans_start(settings: DistillRunSettings, data, model, directory, meta: dict,
                 device: torch.device) -> torch.Tensor:
    """The k-means coreset of --num_pairs pairs: evaluate.py --coreset kmeans's selection (one function for both)."""
    inputs = inputs_for(settings.data, settings.model, data, model, device, settings.runtime.progress,
                        need_train=model.has_trunk)
    chosen, _ = coreset_files.kmeans_coreset(settings.distill.num_pairs, settings.runtime.seed, settings.data,
                                             settings.model, inputs, device, coreset_files.Expert(directory, meta),
                                             progress=settings.runtime.progress)
    print(f"--pix_init kmeans: starting from the real pairs nearest to {settings.distill.num_pairs} k-means centroids")
    return chosen


def main(argv=None) -> int:
    settings = parse_args(argv)
    check_run_paths(settings)
    check_image_size(settings.model.image_encoder, settings.model.image_size)
    check_extra_encoders(settings.model, settings.distill)
    device = pick_device(settings.runtime.device)
    group = distributed.init_from_env(device)
    try:
        return distill(settings, device, group)
    finally:
        distributed.shutdown()


def quiet(*args, **kwargs) -> None:
    """`say` on every process but rank 0: nothing."""


def checked_buffer(settings: DistillRunSettings, text_identity: str, encoder: str) -> tuple[Path, dict]:
    """The expert folder of `encoder` and its metadata, checked against this run (what depends on the data: once
    it is loaded); an extra encoder's folder lies beside --image_encoder's (<dataset>/<encoder>/<text_encoder>)."""
    model = arm_model_settings(settings.model, encoder)
    directory = locate_buffer(settings.distill.buffer_path, settings.data.dataset, settings.model.image_encoder,
                              settings.model.text_encoder)
    directory = directory if encoder == settings.model.image_encoder else directory.parent.parent / encoder / directory.name
    meta = read_metadata(directory)
    expected = expected_metadata(settings.data, model, text_identity)
    if settings.distill.sim_type != "none":  # LoRS: the loss against a learned similarity is the method's choice,
        expected.pop("loss_type")           # not the experts' (they trained against the identity)
    check_buffer_matches(meta, directory, expected)
    return directory, meta


def expert_cycler(settings: DistillRunSettings, buffers: list[tuple[Path, dict]], generator: torch.Generator):
    """The experts a segment stream visits, in an order drawn from its `generator` (one cycler per encoder)."""
    cyclers = [ExpertCycler(directory, meta, generator, settings.distill.max_start_epoch + settings.distill.expert_epochs,
                            settings.distill.max_files, settings.distill.max_experts, settings.distill.expert_epochs)
               for directory, meta in buffers]
    return cyclers[0] if len(cyclers) == 1 else EncoderCyclers(cyclers)


def fresh_stream(settings: DistillRunSettings, buffers: list[tuple[Path, dict]], slot: int, iteration: int) -> SegmentStream:
    """A new stream for segment slot `slot` (not 0, the run's own), first drawn from at `iteration`."""
    generator = torch.Generator().manual_seed(segment_stream_seed(settings.runtime.seed, slot, iteration))
    return SegmentStream(slot, generator, expert_cycler(settings, buffers, generator))


def prepare(settings: DistillRunSettings, device: torch.device,
            group: ProcessGroupInfo) -> tuple[RunWriter, SegmentStreams, ResumePoint]:
    """The checked experts, the data, the learned state (fresh or resumed), the segment streams and the writer:
    everything the first iteration needs, and the point it starts from."""
    main_process = group.is_main
    say = print if main_process else quiet
    progress = settings.runtime.progress and main_process
    files = RunFiles(save_dir_of(settings), create=main_process)
    seed_everything(settings.runtime.seed)
    generator = torch.Generator().manual_seed(settings.runtime.seed)
    text_identity = text_encoder_identity(settings.model.text_encoder, settings.model.text_model)
    encoders = [settings.model.image_encoder, *(settings.distill.extra_image_encoders or [])]
    buffers = [checked_buffer(settings, text_identity, encoder) for encoder in encoders]
    (directory, meta), experts = buffers[0], expert_cycler(settings, buffers, generator)
    experts.peek_check()
    resume = load_resume(settings, text_identity, group, device, say)
    with distributed.main_process_first(group):  # rank 0 builds the caches, the others read them
        data = load_retrieval_data(settings.data, settings.model, device, progress=progress)
    for folder, found in buffers:
        check_data_matches(found, folder, len(data.train.captions), data.text_dim)
    config = run_config(settings, text_identity)
    student_model = build_model(settings.model, data.text_dim).to(device).train()
    students = Students(ReparamModule(student_model.image_part), ReparamModule(student_model.text_projection),
                        student_model.trunk if student_model.has_trunk else None)
    with distributed.main_process_first(group):
        chosen = kmeans_start(settings, data, student_model, directory, meta, device) if settings.distill.pix_init == "kmeans" else None
    images, texts = initial_synthetic_set(data, settings.distill.num_pairs, settings.model.image_size, settings.distill.pix_init, settings.distill.txt_init,
                                          settings.model.text_encoder, generator, image_norm(settings.model), chosen)
    extra_arms = [build_arm(settings, encoder, data.text_dim, device, *found)[0]
                  for encoder, found in zip(encoders[1:], buffers[1:])]
    distiller = Distiller(settings, images, texts, device, students, group, extra_arms)
    streams = SegmentStreams(group, settings.distill.trajectories_per_iteration, SegmentStream(0, generator, experts),
                             partial(fresh_stream, settings, buffers))
    if resume is None:
        point = ResumePoint.capture(distiller, streams, 0)
    else:
        point = resume_point(resume, settings.distill.resume, distiller, streams, say)
        say(f"resumed from {settings.distill.resume} at iteration {point.iteration}")
    check_ranks_agree(point, group, files.last)
    run = start_run(settings.runtime.logging_mode if main_process else "disabled", settings.runtime.wandb_project,
                    settings.runtime.wandb_entity, settings.runtime.name, config, "distill", directory=str(files.dir))
    with distributed.main_process_first(group):
        inputs = inputs_for(settings.data, settings.model, data, student_model, device, progress=progress, need_train=False)
    per_update = streams.total
    also = f" (also for {', '.join(encoders[1:])}, --encoder_schedule {settings.distill.encoder_schedule})" * (len(encoders) > 1)
    say(f"distilling {settings.distill.num_pairs} pairs from {len(experts.files)} expert files in {directory} on {device}"
        f"{f' x {group.world_size} processes' if group.distributed else ''}"
        f"{also}; {per_update} trajectory segment"
        f"{'s' if per_update > 1 else ''} per update; saving to {files.dir}")
    if main_process:
        batch_note("--eval_batch", settings.protocol.eval_batch, settings.distill.num_pairs, "the synthetic set")
    timing = RunTiming.continued(settings.distill.resume, main_process)
    writer = RunWriter(settings, files, config, distiller, timing, run, inputs, data, student_model, group, device)
    return writer, streams, point


def out_of_time(settings: DistillRunSettings, started: float, group: ProcessGroupInfo, device: torch.device) -> bool:
    """Whether --time_budget is spent since `started`: one decision for every process, on rank 0's clock."""
    return bool(settings.distill.time_budget) and distributed.from_main_process(
        time.time() - started > 60 * settings.distill.time_budget, group, device)


def distill(settings: DistillRunSettings, device: torch.device, group: ProcessGroupInfo) -> int:
    """The run, in this process. Under torchrun every process runs it: each draws its own segments, the
    meta-gradients are averaged, and rank 0 alone writes files, logs and prints."""
    writer, streams, point = prepare(settings, device, group)
    say = print if group.is_main else quiet
    files = writer.files
    start_it, started = point.iteration, time.time()
    good = point  # the last point with no skipped step right before it: where a diverged run goes back to
    bar = tqdm(range(start_it, settings.distill.iterations), desc="distill", unit="it", disable=not writer.progress)
    try:
        for iteration in bar:
            if iteration % settings.distill.eval_it == 0 and not point.metrics:
                point = writer.evaluate_and_save(point)
            if point.guard["consecutive"] == 0:
                good = point
            stats, point = writer.timing.step(writer.distiller, streams, point, device)
            if (iteration + 1) % settings.distill.sync_check_it == 0:
                check_ranks_agree(point, group, files.last)
            writer.report_step(iteration, stats, bar)
            if out_of_time(settings, started, group, device) and point.iteration < settings.distill.iterations:
                say(f"--time_budget {settings.distill.time_budget:g} min reached after iteration {point.iteration}: stopping")
                writer.timing.stopped_on_budget(point.iteration)
                break
        point = writer.evaluate_and_save(point) if not point.metrics else point
    except Diverged as err:
        writer.save(files.last, replace(good, guard=after_divergence(good.guard)))  # (good may be a resume with skips behind)
        raise UserError(f"{err}; stopped. The last good distilled set is {files.last} (iteration {good.iteration}): "
                        f"the state before the refused steps; continue from it with --resume and lower "
                        f"--lr_img/--lr_txt/--lr_lr or --syn_steps") from None
    except torch.distributed.DistError as err:  # a process of this torchrun launch died or hangs
        writer.save(files.last, point)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"another process of this run stopped or cannot be reached ({detail}); saved iteration "
                        f"{point.iteration} to {files.last}; continue with --resume {files.last}") from None
    except KeyboardInterrupt:
        writer.save(files.last, point)
        say(f"\ninterrupted: saved iteration {point.iteration} to {files.last}; continue with --resume {files.last}")
        raise
    except UserError as err:  # e.g. a damaged expert file that the cycler reached only now: keep what was learned
        if point.iteration == start_it:
            raise
        writer.save(files.last, point)
        raise UserError(f"{err}; saved iteration {point.iteration} to {files.last}: once that is fixed, continue "
                        f"with --resume {files.last}") from None
    say(writer.finish(point, start_it, started))
    return 0


def cli() -> None:
    """Entry point of the installed command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
