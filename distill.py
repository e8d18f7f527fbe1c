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
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import utils.cli  # noqa: F401 (first: a Ctrl-C while the libraries below load is one line, not a traceback)
import torch
from tqdm import tqdm

from data.build import load_retrieval_data
from data.distilled_set import learned_lr_problem, load_distilled_set, resume_state_problem, save_distilled_set, set_source
from data.model_inputs import inputs_for
from evaluation import coresets
from evaluation.protocol import evaluate_pairs, lr_label, untrained_warning
from evaluation.training import batch_note
from experts.cycler import ExpertCycler
from experts.files import check_buffer_matches, check_data_matches, expected_metadata, locate_buffer, read_metadata
from matching.distiller import Diverged, Distiller
from matching.guard import after_divergence
from matching.streams import SegmentStream, SegmentStreams, saved_streams, streams_entries
from matching.synthetic import initial_synthetic_set
from matching.trajectory import Students
from networks import build_model, check_image_size, image_norm, text_encoder_identity
from reparam_module import ReparamModule
from settings import programs
from settings.programs import DistillRunSettings
from utils.cli import UserError, run_cli
from utils.device import pick_device, seed_everything
from utils.io import atomic_write_json, read_json_if_present
from utils.paths import ensure_output_dir, json_object_in, refuse_outputs_over_inputs
from utils import distributed
from utils.distributed import ProcessGroupInfo
from utils.seeds import distill_eval_seed, segment_stream_seed
from evaluation.metrics import format_summary
from utils.visualize import nearest_captions, save_image_grids, write_nearest_captions
from utils.wandb_logging import start_run

# Settings a resumed run must share with the run that wrote the file.
RESUME_KEYS = ("dataset", "image_encoder", "text_encoder", "text_identity", "image_size", "num_pairs")
RESUME_ALIASES = {"num_queries": "num_pairs"}  # files written before the settings were renamed
# Seconds spent in matching iterations (evaluations excluded) and their count, kept across --resume.
TIMING_NAME = "timing.json"


def parse_args(argv=None) -> DistillRunSettings:
    return programs.parse("distill", __doc__, argv)


def run_config(settings: DistillRunSettings, text_identity: str) -> dict:
    """The run's settings (one key per flag) and what they resolved to, stored in every saved set."""
    config = settings.snapshot()
    config["text_identity"] = text_identity
    config["source"] = "distilled"
    config["image_norm"] = image_norm(settings.model)
    return config


def check_resume(payload: dict, settings: DistillRunSettings, text_identity: str, path) -> None:
    config = {RESUME_ALIASES.get(k, k): v for k, v in payload["config"].items()}
    source = config.get("source", "distilled")
    if source != "distilled":  # a coreset or feature-centroid set: nothing was learned, so nothing to continue
        raise UserError(f"--resume {path} is a {source} set written by evaluate.py, not a distill.py run: it holds "
                        f"no run to continue; --resume takes a distilled_*.pt from a distill.py --save_dir")
    expected = {**settings.snapshot(), "text_identity": text_identity}
    problems = [f"{k}: file has {config.get(k)!r}, this run has {expected[k]!r}"
                for k in RESUME_KEYS if config.get(k) != expected[k]]
    if problems:
        raise UserError(f"--resume {path} does not match this run ({'; '.join(problems)})")
    if not payload.get("state") or "image_syn" not in payload:
        raise UserError(f"--resume {path} holds no optimiser/RNG state or no pixels (not written by distill.py)")
    problem = resume_state_problem(payload["state"])
    if problem:
        raise UserError(f"--resume {path} cannot be resumed: its state {problem}")
    problem = learned_lr_problem(payload)
    if problem:
        raise UserError(f"--resume {path} cannot be resumed: it {problem}")
    if payload["iteration"] > settings.distill.Iteration:
        raise UserError(f"--resume {path} is at iteration {payload['iteration']}, beyond --Iteration {settings.distill.Iteration}")


def kmeans_start(settings: DistillRunSettings, data, model, directory, meta: dict,
                 device: torch.device) -> torch.Tensor:
    """The k-means coreset of --num_pairs pairs (the same selection as evaluate.py --coreset kmeans)."""
    if model.has_trunk:
        outputs = inputs_for(settings.data, settings.model, data, model, device,
                             settings.runtime.progress).train_outputs[0]
        features = coresets.frozen_pair_features(outputs, data)
    else:
        probe = build_model(settings.model, data.text_dim).to(device)
        features, _ = coresets.expert_pair_features(probe, directory, meta, data, settings.data, settings.model, device,
                                                    progress=settings.runtime.progress)
    chosen = coresets.select_kmeans(features, settings.distill.num_pairs, settings.runtime.seed)
    print(f"--pix_init kmeans: starting from the real pairs nearest to {settings.distill.num_pairs} k-means centroids")
    return chosen


@dataclass
class ResumePoint:
    """Everything needed to go on from the start of `iteration` exactly as a run that never stopped: the
    learned state (`Distiller.snapshot`, copied), the random streams, the expert position and the guard's
    history as they were then, the best evaluation so far, and this iteration's evaluation once it ran.

    A run keeps the point of the iteration it is in; whatever happens inside the iteration (a Ctrl-C in a
    step, an evaluation or a write), that point is still whole, and it is what gets saved."""

    iteration: int
    learned: dict
    streams: list[dict]  # every segment stream's state, slot 0 first (matching/streams.py)
    guard: dict
    best_r_mean: float = -1.0
    best_iteration: int = -1  # -1: nothing evaluated yet
    metrics: dict = field(default_factory=dict)

    def state(self) -> dict:
        """The `state` entry of the saved set (docs/file-formats.md)."""
        return {"optimizers": self.learned["state"]["optimizers"], **streams_entries(self.streams),
                "best_r_mean": self.best_r_mean, "best_iteration": self.best_iteration, "guard": self.guard}


class RunFiles:
    """Where a run writes: the distilled sets, grids, nearest captions. The folder is checked (and made) first."""

    def __init__(self, save_dir: Path, create: bool = True):
        self.dir = ensure_output_dir(save_dir, "--save_dir") if create else Path(save_dir)
        self.last = self.dir / "distilled_last.pt"
        self.best = self.dir / "distilled_best.pt"

    def at(self, iteration: int) -> Path:
        return self.dir / f"distilled_{iteration:06d}.pt"


def save_dir_of(settings: DistillRunSettings) -> Path:
    """Where the run writes: --save_dir, else runs/<dataset>/<name>."""
    return Path(settings.distill.save_dir or Path("runs") / settings.data.dataset / settings.runtime.name)


# The files distill.py writes into --save_dir that an earlier run may have left (they are replaced).
OWN_SETS = re.compile(r"distilled_(best|last|\d{6,})\.pt")


def check_paths(settings: DistillRunSettings) -> None:
    """Before any work: the folder this run writes is none of the paths it reads, and the files of its names
    there (sets, timing.json) are distill.py's own, so that replacing them loses nothing of another kind."""
    save_dir, buffer = save_dir_of(settings), settings.distill.buffer_path
    located = locate_buffer(buffer, settings.data.dataset, settings.model.image_encoder, settings.model.text_encoder)
    refuse_outputs_over_inputs({"--save_dir": save_dir, "--cache_dir": settings.data.cache_dir},
                               {"--buffer_path": buffer, "the expert folder of --buffer_path": located,
                                "--resume": settings.distill.resume, **settings.data_paths()})
    if not save_dir.is_dir():
        return
    for path in sorted(save_dir.iterdir()):
        if OWN_SETS.fullmatch(path.name) and set_source(path) != "distilled":
            raise UserError(f"--save_dir {save_dir} holds {path.name}, which is not a set written by distill.py, and "
                            f"this run would replace it: move it away or give --save_dir another folder")
    earlier = save_dir / "distilled_last.pt"
    if earlier.is_file() and not settings.distill.resume and not settings.distill.overwrite:
        raise UserError(f"--save_dir {save_dir} holds an earlier run ({earlier.name}), which this run would replace: "
                        f"continue it with --resume {earlier}, give --save_dir another folder, or pass "
                        f"--overwrite True to start over there")
    timing = save_dir / TIMING_NAME
    if timing.exists() and json_object_in(timing) is None:
        raise UserError(f"--save_dir {save_dir} holds {TIMING_NAME}, which is not distill.py's timing record, and "
                        f"this run would replace it: move it away or give --save_dir another folder")


def main(argv=None) -> int:
    settings = parse_args(argv)
    check_paths(settings)
    check_image_size(settings.model.image_encoder, settings.model.image_size)
    device = pick_device(settings.runtime.device)
    group = distributed.init_from_env(device)
    try:
        return distill(settings, device, group)
    finally:
        distributed.shutdown()


def distill(settings: DistillRunSettings, device: torch.device, group: ProcessGroupInfo) -> int:
    """The run, in this process. Under torchrun every process runs it: each draws its own segments, the
    meta-gradients are averaged, and rank 0 alone writes files, logs and prints."""
    main_process = group.is_main
    say = print if main_process else (lambda *args, **kwargs: None)
    runtime = settings.runtime
    progress = runtime.progress and main_process
    files = RunFiles(save_dir_of(settings), create=main_process)
    seed_everything(runtime.seed)
    generator = torch.Generator().manual_seed(runtime.seed)
    text_identity = text_encoder_identity(settings.model.text_encoder, settings.model.text_model)

    directory = locate_buffer(settings.distill.buffer_path, settings.data.dataset, settings.model.image_encoder, settings.model.text_encoder)
    meta = read_metadata(directory)
    expected = expected_metadata(settings.data, settings.model, text_identity)
    if settings.distill.sim_type != "none":  # LoRS: the loss against a learned similarity is the method's choice,
        expected.pop("loss_type")           # not the experts' (they trained against the identity)
    check_buffer_matches(meta, directory, expected)

    def expert_cycler(stream_generator: torch.Generator) -> ExpertCycler:
        return ExpertCycler(directory, meta, stream_generator, settings.distill.max_start_epoch + settings.distill.expert_epochs,
                            settings.distill.max_files, settings.distill.max_experts, settings.distill.expert_epochs)

    experts = expert_cycler(generator)
    experts.peek_check()
    # Rank 0 reads the file to resume from and hands it to the others: it need not exist on every machine.
    resume = distributed.from_main_process(
        load_distilled_set(settings.distill.resume) if settings.distill.resume and main_process else None, group, device)
    if resume is not None:
        check_resume(resume, settings, text_identity, settings.distill.resume)
        if resume["iteration"] == settings.distill.Iteration:
            say(f"note: --resume {settings.distill.resume} is already at --Iteration {settings.distill.Iteration}: "
                f"nothing is left to learn; give a larger --Iteration to continue it")

    with distributed.main_process_first(group):  # rank 0 builds the caches, the others read them
        data = load_retrieval_data(settings.data, settings.model, device, progress=progress)
    check_data_matches(meta, directory, len(data.train.captions), data.text_dim)
    config = run_config(settings, text_identity)
    student_model = build_model(settings.model, data.text_dim).to(device).train()
    students = Students(ReparamModule(student_model.image_part), ReparamModule(student_model.text_projection),
                        student_model.trunk if student_model.has_trunk else None)
    with distributed.main_process_first(group):
        chosen = kmeans_start(settings, data, student_model, directory, meta, device) if settings.distill.pix_init == "kmeans" else None
    images, texts = initial_synthetic_set(data, settings.distill.num_pairs, settings.model.image_size, settings.distill.pix_init, settings.distill.txt_init,
                                          settings.model.text_encoder, generator, image_norm(settings.model), chosen)
    distiller = Distiller(settings, images, texts, device, students, group)

    def new_stream(slot: int, iteration: int) -> SegmentStream:
        stream_generator = torch.Generator().manual_seed(segment_stream_seed(runtime.seed, slot, iteration))
        return SegmentStream(slot, stream_generator, expert_cycler(stream_generator))

    streams = SegmentStreams(group, settings.distill.trajectories_per_iteration, SegmentStream(0, generator, experts),
                             new_stream)

    def capture(iteration: int, best_r_mean: float = -1.0, best_iteration: int = -1) -> ResumePoint:
        return ResumePoint(iteration, distiller.snapshot(), streams.state(), distiller.guard.state(), best_r_mean,
                           best_iteration)

    if resume is None:
        point = capture(0)
    else:
        point = resume_point(resume, settings.distill.resume, distiller, streams, capture, say)
        say(f"resumed from {settings.distill.resume} at iteration {point.iteration}")
    start_it = point.iteration

    def check_ranks_agree(point: ResumePoint) -> None:
        drifted = distributed.differing_ranks(point.learned, group)
        if drifted:
            raise UserError(f"the processes' synthetic sets differ at iteration {point.iteration} (ranks "
                            f"{', '.join(map(str, drifted))} against rank 0): every process must apply the same "
                            f"averaged update to the same state. Same code, data and buffer on every machine? "
                            f"Continue from {files.last} with --resume")

    check_ranks_agree(point)
    run = start_run(runtime.logging_mode if main_process else "disabled", runtime.wandb_project, runtime.wandb_entity,
                    runtime.name, config, "distill", directory=str(files.dir))
    with distributed.main_process_first(group):
        inputs = inputs_for(settings.data, settings.model, data, student_model, device, progress=progress, need_train=False)
    per_update = streams.total
    say(f"distilling {settings.distill.num_pairs} pairs from {len(experts.files)} expert files in {directory} on {device}"
        f"{f' x {group.world_size} processes' if group.distributed else ''}; {per_update} trajectory segment"
        f"{'s' if per_update > 1 else ''} per update; saving to {files.dir}")
    if main_process:
        batch_note("--batch_train", settings.protocol.batch_train, settings.distill.num_pairs, "the synthetic set")

    def similarity_of(learned: dict) -> torch.Tensor | None:
        return None if distiller.similarity is None else distiller.similarity.submatrix(learned["sim_params"]).detach()

    def save(path: Path, point: ResumePoint) -> None:
        if not main_process:
            return
        learned, similarity = point.learned, similarity_of(point.learned)
        extra = {} if similarity is None else {"similarity": similarity, "sim_params": learned["sim_params"]}
        save_distilled_set(path, learned["image_syn"], learned["text_syn"], learned["syn_lr_img"], learned["syn_lr_txt"],
                           point.iteration, config, point.metrics, point.state(), **extra)
        atomic_write_json(timing, files.dir / TIMING_NAME)

    def evaluate_and_save(point: ResumePoint) -> ResumePoint:
        """Judge the set of `point` (the evaluation models shared out over the processes), write it, and return
        the point with its evaluation and the best so far."""
        iteration, learned = point.iteration, point.learned
        # The models train at the set's two learned step sizes: the image side at one, the text head at the other.
        lr, lr_txt, untrained = learned["syn_lr_img"], learned["syn_lr_txt"], []
        summary = evaluate_pairs(settings.model, settings.protocol, learned["image_syn"], learned["text_syn"], lr, inputs, device,
                                 settings.protocol.num_eval, seed=distill_eval_seed(runtime.seed, iteration), progress=progress,
                                 similarity=similarity_of(learned), model=student_model, group=group, untrained=untrained,
                                 lr_txt=lr_txt)
        if main_process:
            tqdm.write(f"iteration {iteration}: {format_summary(summary)}  (eval {lr_label(lr, lr_txt)}, "
                       f"{settings.protocol.num_eval} models, {settings.data.eval_split}; "
                       f"{distiller.guard.total_skipped} steps skipped so far)")
            if untrained:
                tqdm.write(untrained_warning(untrained, settings.protocol.num_eval))
        run.log({**{f"eval/{k}": v["mean"] for k, v in summary.items()},
                 **{f"eval/{k}_std": v["std"] for k, v in summary.items()}}, step=iteration)
        r_mean = summary["r_mean"]["mean"]
        improved = r_mean > point.best_r_mean
        best = {"best_r_mean": r_mean, "best_iteration": iteration} if improved else {}
        evaluated = replace(point, metrics=summary, **best)
        # The best file first: whichever write a kill interrupts, no file on disk claims a best set that
        # distilled_best.pt does not hold (a resume from the older last file evaluates and writes it again).
        if improved:
            save(files.best, evaluated)
        save(files.at(iteration), evaluated)
        save(files.last, evaluated)
        if settings.distill.draw and main_process:
            draw(iteration, learned["image_syn"], learned["text_syn"])
        return evaluated

    def draw(iteration: int, image_syn: torch.Tensor, text_syn: torch.Tensor) -> None:
        grids = save_image_grids(image_syn, files.dir, f"{iteration:06d}")
        nearest = nearest_captions(text_syn, data.train_text, data.train.captions)
        write_nearest_captions(nearest, files.dir / f"nearest_captions_{iteration:06d}.txt")
        if runtime.logging_mode != "disabled":
            import wandb
            run.log({"Synthetic_Images": wandb.Image(str(grids["plain"])),
                     "Clipped_Synthetic_Images": wandb.Image(str(grids["clipped"])),
                     "Nearest_Captions": wandb.Table(columns=["index", "cosine", "caption"],
                                                     data=[[i, s, c] for i, (c, s) in enumerate(nearest)])},
                    step=iteration)

    started = time.time()
    # Time spent in matching iterations alone (no evaluations), kept across --resume; and the part of it spent
    # averaging over processes. (timing.json beside the sets, not inside them: same-seed runs write identical sets)
    timing = {"seconds": 0.0, "iterations": 0, "sync_seconds": 0.0}
    if resume and main_process:
        timing.update(read_json_if_present(Path(settings.distill.resume).parent / TIMING_NAME) or {})
    good = point  # the last point with no skipped step right before it: where a diverged run goes back to
    bar = tqdm(range(start_it, settings.distill.Iteration), desc="distill", unit="it", disable=not progress)
    try:
        for iteration in bar:
            if iteration % settings.distill.eval_it == 0 and not point.metrics:
                point = evaluate_and_save(point)
            if point.guard["consecutive"] == 0:
                good = point
            began, synced = time.perf_counter(), distiller.sync_seconds
            if device.type == "cuda":  # peak of the matching iterations alone (evaluations train other models)
                torch.cuda.reset_peak_memory_stats(device)
            stats = distiller.step(streams.local, iteration, before=point.learned)
            if device.type == "cuda":
                timing["peak_gpu_mib"] = max(timing.get("peak_gpu_mib", 0.0),
                                             torch.cuda.max_memory_allocated(device) / 2**20)
            point = capture(iteration + 1, point.best_r_mean, point.best_iteration)
            timing["seconds"] += time.perf_counter() - began
            timing["sync_seconds"] = timing.get("sync_seconds", 0.0) + distiller.sync_seconds - synced
            timing["iterations"] += 1
            if (iteration + 1) % settings.distill.sync_check_it == 0:
                check_ranks_agree(point)
            skipped = stats.pop("skipped")
            if skipped and main_process:
                tqdm.write(f"iteration {iteration}: step skipped: {skipped}")
            run.log({**stats, "Skipped_Steps": distiller.guard.total_skipped}, step=iteration)
            bar.set_postfix(loss=f"{stats['Grand_Loss']:.4f}", lr_img=f"{stats['Synthetic_LR_Image']:.4g}",
                            lr_txt=f"{stats['Synthetic_LR_Text']:.4g}", skipped=distiller.guard.total_skipped)
            # One decision for every process: rank 0's clock.
            out_of_time = bool(settings.distill.time_budget) and distributed.from_main_process(
                time.time() - started > 60 * settings.distill.time_budget, group, device)
            if out_of_time and point.iteration < settings.distill.Iteration:
                say(f"--time_budget {settings.distill.time_budget:g} min reached after iteration {point.iteration}: stopping")
                break
        if not point.metrics:
            point = evaluate_and_save(point)
    except Diverged as err:
        save(files.last, replace(good, guard=after_divergence(good.guard)))  # (good may be a resume with skips behind)
        raise UserError(f"{err}; stopped. The last good distilled set is {files.last} (iteration {good.iteration}): "
                        f"the state before the refused steps; continue from it with --resume and lower "
                        f"--lr_img/--lr_txt/--lr_lr or --syn_steps") from None
    except torch.distributed.DistError as err:  # a process of this torchrun launch died or hangs
        save(files.last, point)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"another process of this run stopped or cannot be reached ({detail}); saved iteration "
                        f"{point.iteration} to {files.last}; continue with --resume {files.last}") from None
    except KeyboardInterrupt:
        save(files.last, point)
        say(f"\ninterrupted: saved iteration {point.iteration} to {files.last}; continue with --resume {files.last}")
        raise
    except UserError as err:  # e.g. a damaged expert file that the cycler reached only now: keep what was learned
        if point.iteration == start_it:
            raise
        save(files.last, point)
        raise UserError(f"{err}; saved iteration {point.iteration} to {files.last}: once that is fixed, continue "
                        f"with --resume {files.last}") from None
    run.finish()
    per_iteration = timing["seconds"] / max(timing["iterations"], 1)
    skipped = distiller.guard.skipped
    memory = f", peak GPU memory {timing['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in timing else ""
    say(f"done: {point.iteration - start_it} iterations in {time.time() - started:.0f}s "
        f"({per_iteration:.2f}s per matching iteration{memory}); {distiller.guard.total_skipped} steps skipped"
        f"{' (' + ', '.join(f'{n} {k}' for k, n in skipped.items()) + ')' if skipped else ''}; best r_mean on "
        f"{settings.data.eval_split} {point.best_r_mean:.2f} -> {files.best}; last -> {files.last}")
    return 0


def resume_point(payload: dict, path, distiller: Distiller, streams: SegmentStreams, capture, say) -> ResumePoint:
    """Put the run where the file `path` left it and return that point; a clear error when the file's state
    does not fit this run."""
    state = payload["state"]
    try:
        distiller.restore(payload)
        distiller.guard.restore(state["guard"])
        note = streams.restore(saved_streams(state), payload["iteration"])
    except (ValueError, RuntimeError, UserError) as err:
        raise UserError(f"--resume {path} does not fit this run: {err}") from None
    if note:
        say(f"note: {note}")
    point = capture(payload["iteration"], state["best_r_mean"], state["best_iteration"])
    return replace(point, metrics=payload["metrics"])


def cli() -> None:
    """Entry point of the installed command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
