"""Train expert models on real image-text pairs and save their parameter trajectories.

Each expert is a fresh model (image encoder + text projection head over cached frozen text
embeddings) trained with plain SGD for --train_epochs epochs; a snapshot of all trainable
parameters is taken before training and after every epoch, and every epoch ends with retrieval
evaluation on --eval_split. Experts are written one per file pair,
<buffer_path>/<dataset>/<image_encoder>/<text_encoder>/{img,txt}_replay_buffer_<n>.pt, numbering
from the first free n, so re-running adds experts.

Several processes: `torchrun --nproc_per_node=K buffer.py ...` splits the experts over K processes.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from tqdm import tqdm

from data.build import load_retrieval_data
from data.model_inputs import inputs_from_args
from networks import build_model, trainable_parameters
from utils import distributed
from experts.files import (
    buffer_dir,
    claim_metadata,
    describe_experts,
    next_free_index,
    save_expert,
    save_expert_metrics,
)
from utils.cli import add_bool_flag, run_cli
from settings.flags import add_data_args, add_model_args, add_runtime_args, check_model_args, new_parser
from utils.device import pick_device, seed_everything
from evaluation.metrics import format_metrics, format_summary, summarize_runs
from evaluation.training import (
    evaluate_retrieval,
    scale_learning_rates,
    sgd_pair,
    train_one_epoch,
)
from utils.wandb_logging import start_run


def parse_args(argv=None):
    parser = new_parser(__doc__)
    add_data_args(parser)
    add_model_args(parser)
    group = parser.add_argument_group("experts")
    group.add_argument("--buffer_path", default="./buffers", help="root folder of the expert buffers")
    group.add_argument("--num_experts", type=int, default=100, help="experts to train (added to those present)")
    group.add_argument("--train_epochs", type=int, default=50, help="epochs per expert (snapshots = epochs + 1)")
    group.add_argument("--lr_teacher_img", type=float, default=0.1, help="SGD learning rate of the image encoder")
    group.add_argument("--lr_teacher_txt", type=float, default=0.1, help="SGD learning rate of the text projection")
    group.add_argument("--batch_train", "--batch_size_train", dest="batch_train", type=int, default=128,
                       help="training batch size (real pairs)")
    group.add_argument("--mom", type=float, default=0.0, help="SGD momentum")
    group.add_argument("--l2", type=float, default=0.0, help="SGD weight decay")
    add_bool_flag(group, "--decay", False, "multiply both learning rates by 0.1 after epoch train_epochs // 2 + 1")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    for name in ("num_experts", "train_epochs", "batch_train", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.lr_teacher_img <= 0 or args.lr_teacher_txt <= 0:
        parser.error("learning rates must be positive")
    return args


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().to("cpu", copy=True) for p in trainable_parameters(module)]


@contextmanager
def main_process_first(group: distributed.ProcessGroupInfo):
    """Let rank 0 build shared caches before the other ranks read them."""
    if not group.is_main:
        distributed.barrier()
    yield
    if group.is_main:
        distributed.barrier()


def train_expert(args, inputs, device, seed: int, label: str, run):
    """Train one expert; returns its image and text trajectories and its per-epoch statistics."""
    data = inputs.data
    seed_everything(seed)
    model = build_model(args, data.text_dim).to(device)
    optimizers = sgd_pair(model, args.lr_teacher_img, args.lr_teacher_txt, args.mom, args.l2)
    loader = inputs.train_batches(args.batch_train, seed)
    image_traj, text_traj = [snapshot(model.image_part)], [snapshot(model.text_projection)]
    decay_after = args.train_epochs // 2 + 1
    history = []
    epochs = tqdm(range(args.train_epochs), desc=label, unit="epoch", disable=not args.progress)
    for epoch in epochs:
        stats = train_one_epoch(model, loader, optimizers, device, args.progress, desc=f"epoch {epoch}",
                                loss_type=args.loss_type)
        metrics = evaluate_retrieval(model, inputs.eval_images(), data.eval_text, data.eval_txt2img, device,
                                     args.progress)
        image_traj.append(snapshot(model.image_part))
        text_traj.append(snapshot(model.text_projection))
        run.log({**stats, **metrics, "epoch": epoch})
        history.append({"epoch": epoch + 1, **stats, **metrics})
        epochs.write(f"{label} epoch {epoch}: loss {stats['train_loss']:.4f} acc {stats['train_acc']:.3f} | "
                     f"{format_metrics(metrics)}")
        if args.decay and epoch == decay_after:
            scale_learning_rates(optimizers, 0.1)
    return image_traj, text_traj, history


def main(argv=None) -> int:
    args = parse_args(argv)
    check_model_args(args)
    device = pick_device(args.device)
    group = distributed.init_from_env(device)
    with main_process_first(group):
        data = load_retrieval_data(args, device, progress=args.progress and group.is_main)
        probe = build_model(args, data.text_dim)
        # With a frozen trunk its outputs are computed once (rank 0 first) and every expert trains over them.
        inputs = inputs_from_args(args, data, probe, device, progress=args.progress and group.is_main)
    directory = buffer_dir(args.buffer_path, args.dataset, args.image_encoder, args.text_encoder)
    with main_process_first(group):
        if group.is_main:
            claim_metadata(directory, describe_experts(args, probe, data.text_identity, data.text_dim,
                                                              len(data.train.captions)))
        first = next_free_index(directory)
    distributed.barrier()  # every rank has read `first` before anyone writes an expert

    print(f"[rank {group.rank}] {len(data.train.captions)} train pairs ({len(data.train.image_paths)} images), "
          f"{len(data.eval.image_paths)} {args.eval_split} images; device {device}; experts -> {directory}")
    run = start_run(args, "buffer", suffix=f"-rank{group.rank}" if group.world_size > 1 else "")
    finals, start = [], time.time()
    for index in group.my_share(args.num_experts):
        number = first + index
        label = f"expert {number}"
        started = time.time()
        image_traj, text_traj, history = train_expert(args, inputs, device, args.seed * 100_003 + number,
                                                      label, run)
        saved = save_expert(directory, number, image_traj, text_traj)
        save_expert_metrics(directory, saved, history, {"eval_split": args.eval_split,
                                                        "seconds": round(time.time() - started, 1)})
        finals.append({k: v for k, v in history[-1].items() if k not in ("epoch", "train_loss", "train_acc")})
        print(f"saved {label} -> {directory}/{{img,txt}}_replay_buffer_{saved}.pt")
    if finals:
        print(f"[rank {group.rank}] {len(finals)} experts in {time.time() - start:.0f}s; final retrieval "
              f"on {args.eval_split} (mean ± std over experts): {format_summary(summarize_runs(finals))}")
    run.finish()
    distributed.shutdown()
    return 0


def cli() -> None:
    """Entry point of the installed command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
