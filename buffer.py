"""Train expert models on real image-text pairs and save their parameter trajectories.

Each expert is a fresh model (image encoder + text projection head over cached frozen text
embeddings) trained with plain SGD for --train_epochs epochs; a snapshot of all trainable
parameters is taken before training and after every epoch, and every epoch ends with retrieval
evaluation on --eval_split. Experts are written one per file pair,
<buffer_path>/<dataset>/<image_encoder>/<text_encoder>/{img,txt}_replay_buffer_<n>.pt, numbering
from the lowest free n, so re-running adds experts. `--buffer_format safetensors` writes one
expert_<n>.safetensors per expert and the index buffer_index.json instead (read memory-mapped);
distill.py and evaluate.py read either, and a folder holds one of the two.

Interruptions: the expert in training is kept in a hidden partial folder after every epoch
(experts/checkpoint.py); simply rerunning the command removes what the killed run left (temporary
files, half-written pairs) and continues its partial expert under the same number, so that the
finished expert is bit-identical to one trained in one go (with --num_workers 0 or cached trunk
outputs: loader worker processes keep random state of their own). The written files hold no
timestamps: two runs with the same seed write identical .pt files (timing is in metrics_<n>.json).

Several processes: `torchrun --nproc_per_node=K buffer.py ...` splits the experts over K processes.
"""
from __future__ import annotations

import sys
import time

import utils.cli  # noqa: F401 (first: a Ctrl-C while the libraries below load is one line, not a traceback)
import torch
from tqdm import tqdm

from data.build import load_retrieval_data
from data.model_inputs import inputs_for
from networks import build_model, check_image_size, trainable_parameters
from settings import programs
from settings.programs import BufferSettings
from utils import distributed
from experts.checkpoint import ExpertCheckpoint, numbers_to_train, tidy
from experts.files import buffer_dir, claim_metadata, describe_experts, save_expert, save_expert_metrics, saved_files
from utils.cli import run_cli
from utils.device import pick_device, seed_everything
from utils.io import owner_tag
from utils.paths import ensure_output_dir, refuse_outputs_over_inputs
from utils.seeds import expert_seed
from evaluation.metrics import format_metrics, format_summary, summarize_runs
from evaluation.training import (
    TrainingWatch,
    batch_note,
    evaluate_retrieval,
    scale_learning_rates,
    sgd_pair,
    train_one_epoch,
)
from utils.wandb_logging import start_run


def parse_args(argv=None) -> BufferSettings:
    return programs.parse("buffer", __doc__, argv)


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    """An expert snapshot: the trainable parameters at one epoch, copied to the CPU (the only meaning of
    "snapshot" in this project; a run's flat settings are `flat_config`, the learned synthetic state a
    `learned_copy`)."""
    return [p.detach().to("cpu", copy=True) for p in trainable_parameters(module)]


# Settings that do not change an expert's training (left out when a partial expert is continued).
NOT_SHAPING_AN_EXPERT = ("num_experts", "buffer_path", "buffer_format", "cache_dir", "wandb_mode", "wandb_project",
                         "wandb_entity", "name", "progress")


def expert_settings(settings: BufferSettings, device, seed: int) -> dict:
    """What an expert's training depends on: a partial expert is continued only under the same."""
    shaping = {k: v for k, v in settings.flat_config().items() if k not in NOT_SHAPING_AN_EXPERT}
    return {**shaping, "expert_seed": seed, "device": device.type}


def train_expert(settings: BufferSettings, inputs, device, seed: int, label: str, run,
                 checkpoint: ExpertCheckpoint, resumed: dict | None = None):
    """Train one expert (continuing from `resumed`, a checkpoint state, if given), saving `checkpoint`
    after every epoch; returns its image and text trajectories and its per-epoch statistics."""
    data, how, progress = inputs.data, settings.experts, settings.runtime.progress
    started = time.time() - (resumed["seconds"] if resumed else 0.0)  # seconds count across interruptions
    seed_everything(seed)
    model = build_model(settings.model, data.text_dim).to(device)
    optimizers = sgd_pair(model, how.expert_lr_img, how.expert_lr_txt, how.expert_momentum, how.expert_weight_decay)
    loader = inputs.train_batches(how.expert_batch, seed)
    if resumed is None:
        image_traj, text_traj = [snapshot(model.image_part)], [snapshot(model.text_projection)]
        checkpoint.save_snapshot(0, image_traj[0], text_traj[0])
        history, done = [], 0
    else:
        image_traj, text_traj = checkpoint.restore(resumed, model, optimizers, loader)
        history, done = resumed["history"], resumed["epochs_done"]
    decay_after = how.train_epochs // 2 + 1
    epochs = tqdm(range(done, how.train_epochs), desc=label, unit="epoch", disable=not progress)
    for epoch in epochs:
        watch = TrainingWatch()
        stats = train_one_epoch(model, loader, optimizers, device, progress, desc=f"epoch {epoch}",
                                loss_type=settings.model.loss_type, watch=watch)
        metrics = evaluate_retrieval(model, inputs.eval_images(), data.eval_text, data.eval_txt2img, device,
                                     progress)
        image_traj.append(snapshot(model.image_part))
        text_traj.append(snapshot(model.text_projection))
        run.log({**stats, **metrics, "epoch": epoch})
        history.append({"epoch": epoch + 1, **stats, **metrics, "steps": watch.steps,
                        "gradient_steps": watch.gradient_steps})
        epochs.write(f"{label} epoch {epoch}: loss {stats['train_loss']:.4f} acc {stats['train_acc']:.3f} | "
                     f"{format_metrics(metrics)}")
        if how.decay and epoch == decay_after:
            scale_learning_rates(optimizers, 0.1)
        checkpoint.save_snapshot(epoch + 1, image_traj[-1], text_traj[-1])
        checkpoint.save(epoch + 1, model, optimizers, loader, history, time.time() - started)
    return image_traj, text_traj, history, time.time() - started


# The keys of an epoch's history that are not retrieval metrics.
NOT_METRICS = ("epoch", "train_loss", "train_acc", "steps", "gradient_steps")


def untrained_problem(image_traj: list, text_traj: list, history: list[dict]) -> str | None:
    """Why an expert did not train (evaluation.training.TrainingWatch: no step, no non-zero gradient, or every
    tensor at the end bit-identical to its start), or None. Epochs of a partial expert written before steps were
    counted count as one step with a gradient."""
    watch = TrainingWatch(sum(h.get("steps", 1) for h in history), sum(h.get("gradient_steps", 1) for h in history))
    return watch.problem(image_traj[0] + text_traj[0], image_traj[-1] + text_traj[-1])


def check_paths(settings: BufferSettings) -> None:
    """The folders this run writes (experts, caches) are none of those it reads."""
    refuse_outputs_over_inputs({"--buffer_path": settings.experts.buffer_path, "--cache_dir": settings.data.cache_dir},
                               settings.data_paths())


def main(argv=None) -> int:
    settings = parse_args(argv)
    check_paths(settings)
    runtime, model_settings = settings.runtime, settings.model
    check_image_size(model_settings.image_encoder, model_settings.image_size)
    ensure_output_dir(settings.experts.buffer_path, "--buffer_path")  # a bad folder fails now, not after training
    device = pick_device(runtime.device)
    group = distributed.init_from_env(device)
    with distributed.main_process_first(group):
        progress = runtime.progress and group.is_main
        data = load_retrieval_data(settings.data, model_settings, device, progress=progress)
        probe = build_model(model_settings, data.text_dim)
        # With a frozen trunk its outputs are computed once (rank 0 first) and every expert trains over them.
        inputs = inputs_for(settings.data, model_settings, data, probe, device, progress=progress)
    directory = buffer_dir(settings.experts.buffer_path, settings.data.dataset, model_settings.image_encoder,
                           model_settings.text_encoder)
    with distributed.main_process_first(group):
        if group.is_main:
            claim_metadata(directory, describe_experts(settings.data, model_settings, probe, data.text_identity,
                                                       data.text_dim, len(data.train.captions)),
                           settings.experts.buffer_format)
            tidy(directory)
    # Rank 0 claims every number, each in the name of the process that trains it (my_share's round robin), so
    # that another buffer.py started on this folder at the same time takes other numbers.
    count, owners = settings.experts.num_experts, distributed.gather_objects(owner_tag(), group)
    numbers = distributed.from_main_process(
        numbers_to_train(directory, count, [owners[i % group.world_size] for i in range(count)]) if group.is_main
        else None, group, device)

    print(f"[rank {group.rank}] {len(data.train.captions)} train pairs ({len(data.train.image_paths)} images), "
          f"{len(data.eval.image_paths)} {settings.data.eval_split} images; device {device}; experts -> {directory}")
    run = start_run(runtime.logging_mode, runtime.wandb_project, runtime.wandb_entity, runtime.name,
                    settings.flat_config(), "buffer", suffix=f"-rank{group.rank}" if group.world_size > 1 else "")
    batch_note("--expert_batch", settings.experts.expert_batch, len(data.train.captions), "the training split")
    finals, failed, start = [], [], time.time()
    for index in group.my_share(settings.experts.num_experts):
        number, label = numbers[index], f"expert {numbers[index]}"
        seed = expert_seed(runtime.seed, number)
        checkpoint, resumed = ExpertCheckpoint.claim(directory, number, expert_settings(settings, device, seed))
        if resumed is not None:
            print(f"{label}: continuing the interrupted run's expert after epoch {resumed['epochs_done']}")
        image_traj, text_traj, history, seconds = train_expert(settings, inputs, device, seed, label, run,
                                                               checkpoint, resumed)
        problem = untrained_problem(image_traj, text_traj, history)
        saved = save_expert(directory, number, image_traj, text_traj, settings.experts.buffer_format)
        untrained = {"did_not_train": problem} if problem else {}
        save_expert_metrics(directory, saved, history, {"eval_split": settings.data.eval_split,
                                                        "seconds": round(seconds, 1), **untrained})
        if problem:
            failed.append(saved)
            print(f"WARNING: expert {saved} did not train: {problem}. It is saved, with this warning in "
                  f"metrics_{saved}.json; distilling from it would match a trajectory that learned nothing",
                  file=sys.stderr)
        checkpoint.remove()
        finals.append({k: v for k, v in history[-1].items() if k not in NOT_METRICS})
        print(f"saved {label} -> {saved_files(directory, saved, settings.experts.buffer_format)}")
    if finals:
        print(f"[rank {group.rank}] {len(finals)} experts in {time.time() - start:.0f}s; final retrieval "
              f"on {settings.data.eval_split} (mean ± std over experts): {format_summary(summarize_runs(finals))}"
              + (f"; WARNING: experts {', '.join(map(str, failed))} did not train (see above)" if failed else ""))
    run.finish()
    distributed.shutdown()
    return 0


def cli() -> None:
    """Entry point of the installed command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
