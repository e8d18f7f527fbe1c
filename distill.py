"""Distill a tiny synthetic set of image-text pairs by matching expert trajectories.

State being learned: synthetic images (N×3×H×W normalised pixels), synthetic text embeddings (N×D,
in the frozen text encoder's space) and two step sizes (image encoder, text head). Each iteration
takes an expert trajectory, starts a student at epoch `start` of it, takes --syn_steps SGD steps on
random synthetic minibatches (graph kept), and minimises the distance to the expert's parameters
--expert_epochs later, normalised by how far the expert moved. Every --eval_it iterations fresh
models are trained on the synthetic set and tested; the set is saved to --save_dir then
(distilled_<it>.pt, distilled_last.pt, distilled_best.pt), and resumable with --resume.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.build import load_retrieval_data
from data.model_inputs import inputs_from_args
from data.distilled_set import load_distilled_set, save_distilled_set
from experts.cycler import ExpertCycler, check_buffer_matches, locate_buffer
from matching.guard import StepGuard
from matching.meta_gradient import MATCHING_MODES, matching_gradients
from matching.synthetic import initial_synthetic_set
from matching.trajectory import Students, contrastive_step_loss, draw_blends, draw_minibatches, pick_segment
from networks import build_model, image_norm, text_encoder_identity, trainable_parts
from networks.similarity import SIM_TYPES, similarity_from_args
from reparam_module import ReparamModule
from evaluation import coresets
from experts.files import read_metadata
from utils.cli import UserError, add_bool_flag, run_cli
from settings.flags import (
    add_data_args,
    add_eval_args,
    add_model_args,
    add_runtime_args,
    check_model_args,
    new_parser,
)
from utils.device import pick_device, seed_everything
from utils.dsa import check_strategy, dsa_augment
from evaluation.protocol import evaluate_pairs
from evaluation.metrics import format_summary
from utils.visualize import nearest_captions, save_image_grids, write_nearest_captions
from utils.wandb_logging import start_run

# Settings a resumed run must share with the run that wrote the file.
RESUME_KEYS = ("dataset", "image_encoder", "text_encoder", "text_identity", "image_size", "num_queries")


def parse_args(argv=None):
    parser = new_parser(__doc__)
    add_data_args(parser)
    add_model_args(parser)
    group = parser.add_argument_group("trajectory matching")
    group.add_argument("--buffer_path", default="./buffers",
                       help="buffer root (dataset/image_encoder/text_encoder is appended) or the folder of the files")
    group.add_argument("--syn_steps", type=int, default=20, help="student SGD steps per iteration")
    group.add_argument("--matching", default="unroll", choices=MATCHING_MODES,
                       help="how the meta-gradient is computed: unroll = one graph through all student steps (the "
                            "reference; memory grows with --syn_steps); exact_lowmem = the same gradient by a reverse "
                            "sweep that rebuilds one step at a time (memory flat in --syn_steps, 1.0-1.3x the time in "
                            "BENCHMARKS.md 8); tesla = TESLA/LoRS's approximation: that sweep without the Hessian "
                            "terms")
    group.add_argument("--expert_epochs", type=int, default=3, help="expert epochs between start and target")
    group.add_argument("--max_start_epoch", type=int, default=25, help="start epoch is drawn from 0..max_start_epoch-1")
    group.add_argument("--num_queries", type=int, default=100, help="synthetic pairs N")
    group.add_argument("--mini_batch_size", type=int, default=100, help="synthetic pairs per student step")
    group.add_argument("--Iteration", type=int, default=50000, help="distillation iterations")
    group.add_argument("--lr_img", type=float, default=1000, help="learning rate of the synthetic images")
    group.add_argument("--lr_txt", type=float, default=1000, help="learning rate of the synthetic text embeddings")
    group.add_argument("--lr_lr", type=float, default=1e-3, help="learning rate of the two learned step sizes")
    group.add_argument("--lr_teacher_img", type=float, default=0.1, help="initial student step size, image encoder")
    group.add_argument("--lr_teacher_txt", type=float, default=0.1, help="initial student step size, text head")
    group.add_argument("--pix_init", default="real", choices=("real", "clean", "kmeans", "noise"),
                       help="synthetic image initialisation: real = random training images through the training "
                            "augmentation (the reference), clean = the same without augmentation, kmeans = the "
                            "k-means coreset (the real pair nearest to each of N centroids of the joint image+text "
                            "features: the frozen trunk's, else the first expert's), noise = Gaussian")
    group.add_argument("--txt_init", default="real", choices=("real", "noise"), help="synthetic text initialisation")
    group.add_argument("--sim_type", default="none", choices=SIM_TYPES,
                       help="LoRS: learn the target similarity between synthetic images and texts: none = identity "
                            "(the paper), full = an N x N matrix, lowrank = diag(a) + (sim_alpha / sim_rank) L R^T; "
                            "saved with the set and used by evaluate.py")
    group.add_argument("--sim_rank", type=int, default=10, help="rank r of the low-rank similarity")
    group.add_argument("--sim_alpha", type=float, default=1.0, help="scale alpha of the low-rank part")
    group.add_argument("--lr_sim", type=float, default=10.0, help="learning rate of the similarity (SGD momentum 0.5)")
    group.add_argument("--blend_alpha", type=float, default=0.0,
                       help="RepBlend: in every student step blend the minibatch's image and text representations "
                            "with a shuffled copy, lambda ~ Beta(A, A) (0 = off)")
    group.add_argument("--max_files", type=int, default=None, help="use only this many expert files")
    group.add_argument("--max_experts", type=int, default=None, help="use only this many experts per file")
    group.add_argument("--skip_spikes", type=float, default=10.0,
                       help="skip (and count) a step whose meta-gradient norm, for the pixels, texts, step sizes or "
                            "similarity, exceeds this many times its median over the last 20 applied steps (0 = "
                            "never skip a finite step); non-finite steps and steps that would make a step size "
                            "non-positive are always skipped")
    group.add_argument("--max_skips", type=int, default=20,
                       help="stop (keeping the last good set) after this many skipped steps in a row")
    group.add_argument("--eval_it", type=int, default=50, help="evaluate and save every this many iterations")
    group.add_argument("--time_budget", type=float, default=None, metavar="MINUTES",
                       help="stop after this many minutes (at the end of an iteration), then evaluate and save as "
                            "at the end of a run; comparisons at equal CPU time")
    add_bool_flag(group, "--draw", True, "save image grids and nearest real captions at each evaluation")
    group.add_argument("--save_dir", default=None, help="output folder (default: runs/<dataset>/<name>)")
    group.add_argument("--resume", default=None, help="a distilled_*.pt of an earlier run to continue from")
    add_eval_args(parser, batch_train_default=64)
    add_runtime_args(parser)
    return parser.parse_args(argv)


def check_args(args) -> None:
    """Clear one-line errors for settings that cannot work, before any heavy work."""
    for name in ("syn_steps", "expert_epochs", "max_start_epoch", "num_queries", "mini_batch_size", "Iteration",
                 "eval_it", "num_eval", "epoch_eval_train", "batch_train", "image_size", "max_skips"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr_img", "lr_txt", "lr_lr", "lr_teacher_img", "lr_teacher_txt", "lr_sim", "sim_rank"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.time_budget is not None and not args.time_budget > 0:
        raise UserError(f"--time_budget must be a positive number of minutes, got {args.time_budget}")
    if not args.skip_spikes >= 0:
        raise UserError(f"--skip_spikes must be 0 (off) or positive, got {args.skip_spikes}")
    if args.blend_alpha < 0:
        raise UserError(f"--blend_alpha must be 0 (off) or positive, got {args.blend_alpha}")
    check_model_args(args)
    if args.mini_batch_size > args.num_queries:
        raise UserError(f"--mini_batch_size {args.mini_batch_size} is larger than --num_queries {args.num_queries}")
    if args.dsa:
        try:
            check_strategy(args.dsa_strategy)
        except ValueError as err:
            raise UserError(f"--dsa_strategy: {err}") from None


def run_config(args, text_identity: str) -> dict:
    """Plain values describing the run, stored in every saved set."""
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    config["text_identity"] = text_identity
    config["source"] = "distilled"
    config["image_norm"] = image_norm(args)
    return config


def check_resume(payload: dict, args, text_identity: str, path) -> None:
    config = payload["config"]
    expected = {**vars(args), "text_identity": text_identity}
    problems = [f"{k}: file has {config.get(k)!r}, this run has {expected[k]!r}"
                for k in RESUME_KEYS if config.get(k) != expected[k]]
    if problems:
        raise UserError(f"--resume {path} does not match this run ({'; '.join(problems)})")
    if not payload.get("state"):
        raise UserError(f"--resume {path} holds no optimiser/RNG state (not written by distill.py)")
    if payload["iteration"] > args.Iteration:
        raise UserError(f"--resume {path} is at iteration {payload['iteration']}, beyond --Iteration {args.Iteration}")


def kmeans_start(args, data, model, directory, meta: dict, device: torch.device) -> torch.Tensor:
    """The k-means coreset of --num_queries pairs (the same selection as evaluate.py --coreset kmeans)."""
    if model.has_trunk:
        outputs = inputs_from_args(args, data, model, device, args.progress).train_outputs[0]
        features = coresets.frozen_pair_features(outputs, data)
    else:
        probe = build_model(args, data.text_dim).to(device)
        features, _ = coresets.expert_pair_features(probe, directory, meta, data, args, device)
    chosen = coresets.select_kmeans(features, args.num_queries, args.seed)
    print(f"--pix_init kmeans: starting from the real pairs nearest to {args.num_queries} k-means centroids")
    return chosen


class Distiller:
    """The learned state of a run (pixels, text embeddings, step sizes, a similarity's parameters) and
    one trajectory-matching iteration on it."""

    def __init__(self, args, images: torch.Tensor, texts: torch.Tensor, device: torch.device, students: Students,
                 generator: torch.Generator):
        self.args, self.device, self.students = args, device, students
        self.image_syn = images.to(device).requires_grad_(True)
        self.text_syn = texts.to(device).requires_grad_(True)
        self.syn_lr_img = torch.tensor(float(args.lr_teacher_img), device=device, requires_grad=True)
        self.syn_lr_txt = torch.tensor(float(args.lr_teacher_txt), device=device, requires_grad=True)
        self.similarity = similarity_from_args(args, args.num_queries) if args.sim_type != "none" else None
        self.sim_params = ([t.requires_grad_(True) for t in self.similarity.initial_params(generator, device)]
                           if self.similarity else [])
        self.optimizers = {
            "img": torch.optim.SGD([self.image_syn], lr=args.lr_img, momentum=0.5),
            "txt": torch.optim.SGD([self.text_syn], lr=args.lr_txt, momentum=0.5),
            "lr": torch.optim.SGD([self.syn_lr_img, self.syn_lr_txt], lr=args.lr_lr, momentum=0.5),
        }
        if self.sim_params:
            self.optimizers["sim"] = torch.optim.SGD(self.sim_params, lr=args.lr_sim, momentum=0.5)
        self.guard = StepGuard(args.skip_spikes, max_consecutive=args.max_skips)

    def augment(self, seed_base: int):
        if not self.args.dsa:
            return None
        return lambda images, step: dsa_augment(images, self.args.dsa_strategy, seed_base + step)

    def similarity_matrix(self) -> torch.Tensor | None:
        """The learned N x N target similarity (None: identity)."""
        return None if self.similarity is None else self.similarity.submatrix(self.sim_params).detach()

    def step(self, experts: ExpertCycler, generator: torch.Generator, iteration: int) -> dict:
        args = self.args
        image_traj, text_traj = experts.next()
        segment = pick_segment(image_traj, text_traj, args.max_start_epoch, args.expert_epochs, generator, self.device)
        batches = draw_minibatches(args.num_queries, args.mini_batch_size, args.syn_steps, generator)
        augment = self.augment(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        blends = draw_blends(args.syn_steps, args.mini_batch_size, args.blend_alpha, generator) \
            if args.blend_alpha > 0 else None
        # A frozen trunk runs once per iteration on every synthetic image (one augmentation draw when DSA is
        # on); the student steps then see its outputs, and their gradient flows back through it at the end.
        features_given = self.students.frozen_encoder is not None
        if features_given:
            pixels = self.image_syn if augment is None else augment(self.image_syn, 0)
            features = self.students.frozen_encoder(pixels)
            image_input = features.detach().requires_grad_(True)
            augment = None
        else:
            image_input = self.image_syn
        step_loss = contrastive_step_loss(self.students, batches, augment, self.similarity, args.loss_type, blends,
                                          features_given)
        result = matching_gradients(args.matching, self.students, step_loss, len(batches),
                                    (image_input, self.text_syn, *self.sim_params), self.syn_lr_img,
                                    self.syn_lr_txt, segment)
        terms = {"image": result.image_term.item(), "text": result.text_term.item()}
        stats = {"Grand_Loss": terms["image"] + terms["text"], "img_param_loss": terms["image"],
                 "txt_param_loss": terms["text"], "Start_Epoch": segment.start_epoch}
        bad = [f"{name} term {value}" for name, value in terms.items() if not math.isfinite(value)]
        if bad:
            return self._skip(iteration, "non-finite matching loss (" + ", ".join(bad) + ")", stats)
        image_grad, text_grad, *sim_grads = result.learned_grads
        if features_given:
            (image_grad,) = torch.autograd.grad(features, self.image_syn, image_grad)
        gradients = (image_grad, text_grad, result.lr_img_grad, result.lr_txt_grad, *sim_grads)
        norms = {"pixels": image_grad.norm().item(), "texts": text_grad.norm().item(),
                 "step sizes": torch.stack([result.lr_img_grad, result.lr_txt_grad]).norm().item()}
        if sim_grads:
            norms["similarity"] = math.sqrt(sum(g.pow(2).sum().item() for g in sim_grads))
        problem = self.guard.gradient_problem(norms)
        if problem:
            return self._skip(iteration, problem, stats)
        learned = (self.image_syn, self.text_syn, self.syn_lr_img, self.syn_lr_txt, *self.sim_params)
        for tensor, gradient in zip(learned, gradients):
            tensor.grad = gradient
        before = self.snapshot()
        for optimizer in self.optimizers.values():
            optimizer.step()
        problem = self.state_problem()
        if problem:
            self.restore(before)  # the state before this step: the last good one
            return self._skip(iteration, problem, stats)
        self.guard.applied(norms)
        return {**stats, "Synthetic_LR_Image": self.syn_lr_img.item(), "Synthetic_LR_Text": self.syn_lr_txt.item(),
                "skipped": None}

    def state_problem(self) -> str | None:
        """What is wrong with the learned state after a step (None: nothing)."""
        for name, lr in (("syn_lr_img", self.syn_lr_img), ("syn_lr_txt", self.syn_lr_txt)):
            value = lr.item()
            if not value > 0:  # also catches NaN
                return f"step size not positive ({name} would become {value:.4g})"
        for name, tensor in (("image_syn", self.image_syn), ("text_syn", self.text_syn),
                             *((f"similarity {i}", t) for i, t in enumerate(self.sim_params))):
            if not torch.isfinite(tensor).all():
                return f"non-finite values ({name})"
        return None

    def _skip(self, iteration: int, reason: str, stats: dict) -> dict:
        """Leave the learned state as it was, count the skip, and stop after too many in a row."""
        self.guard.skip(reason)
        if self.guard.exhausted:
            raise NonFiniteLoss(iteration, f"{self.guard.consecutive} steps in a row skipped, the last for {reason}")
        return {**stats, "Synthetic_LR_Image": self.syn_lr_img.item(), "Synthetic_LR_Text": self.syn_lr_txt.item(),
                "skipped": reason}

    def state(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def snapshot(self) -> dict:
        """The learned tensors, step sizes and optimiser states, copied (the format `restore` takes)."""
        return {"image_syn": self.image_syn.detach().clone(), "text_syn": self.text_syn.detach().clone(),
                "syn_lr_img": self.syn_lr_img.item(), "syn_lr_txt": self.syn_lr_txt.item(),
                "sim_params": [t.detach().clone() for t in self.sim_params],
                "state": {"optimizers": copy.deepcopy(self.state())}}

    def restore(self, payload: dict) -> None:
        with torch.no_grad():
            self.image_syn.copy_(payload["image_syn"])
            self.text_syn.copy_(payload["text_syn"])
            self.syn_lr_img.fill_(payload["syn_lr_img"])
            self.syn_lr_txt.fill_(payload["syn_lr_txt"])
            for tensor, saved in zip(self.sim_params, payload.get("sim_params", [])):
                tensor.copy_(saved)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(payload["state"]["optimizers"][name])


class NonFiniteLoss(UserError):
    """Distillation diverged: too many steps in a row were skipped as non-finite, spikes or leaving a step
    size that is not positive."""

    def __init__(self, iteration: int, detail: str):
        super().__init__(f"distillation diverged at iteration {iteration} ({detail})")
        self.iteration = iteration


def rng_state(generator: torch.Generator) -> dict:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunFiles:
    """Where a run writes: the distilled sets, grids, nearest captions."""

    def __init__(self, save_dir: Path):
        self.dir = save_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.last = save_dir / "distilled_last.pt"
        self.best = save_dir / "distilled_best.pt"

    def at(self, iteration: int) -> Path:
        return self.dir / f"distilled_{iteration:06d}.pt"


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    seed_everything(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    text_identity = text_encoder_identity(args.text_encoder, args.text_model)

    directory = locate_buffer(args.buffer_path, args.dataset, args.image_encoder, args.text_encoder)
    meta = read_metadata(directory)
    check_buffer_matches(meta, directory, {"dataset": args.dataset, "image_encoder": args.image_encoder,
                                           "text_encoder": args.text_encoder, "text_model": text_identity,
                                           "image_size": args.image_size, "trainable_parts": trainable_parts(args),
                                           "image_norm": image_norm(args)})
    experts = ExpertCycler(directory, meta, generator, args.max_start_epoch + args.expert_epochs,
                           args.max_files, args.max_experts)
    experts.peek_check()
    resume = load_distilled_set(args.resume) if args.resume else None
    if resume is not None:
        check_resume(resume, args, text_identity, args.resume)

    data = load_retrieval_data(args, device, progress=args.progress)
    if meta.get("train_pairs") not in (None, len(data.train.captions)):
        raise UserError(f"the experts in {directory} were trained on {meta['train_pairs']} pairs, this run's training "
                        f"split has {len(data.train.captions)} (same --max_train_images as buffer.py?)")
    if data.text_dim != meta["text_dim"]:
        raise UserError(f"text embeddings have {data.text_dim} dimensions, the experts were trained on {meta['text_dim']}")
    files = RunFiles(Path(args.save_dir or Path("runs") / args.dataset / args.name))
    config = run_config(args, text_identity)
    student_model = build_model(args, data.text_dim).to(device).train()
    students = Students(ReparamModule(student_model.image_part), ReparamModule(student_model.text_projection),
                        student_model.trunk if student_model.has_trunk else None)
    chosen = kmeans_start(args, data, student_model, directory, meta, device) if args.pix_init == "kmeans" else None
    images, texts = initial_synthetic_set(data, args.num_queries, args.image_size, args.pix_init, args.txt_init,
                                          args.text_encoder, generator, image_norm(args), chosen)
    distiller = Distiller(args, images, texts, device, students, generator)
    start_it, best_r_mean, evaluated_at_start = 0, -1.0, False
    if resume is not None:
        distiller.restore(resume)
        restore_rng(resume["state"]["rng"], generator)
        experts.restore(resume["state"]["experts"])
        distiller.guard.restore(resume["state"].get("guard", {}))
        start_it, best_r_mean = resume["iteration"], resume["state"]["best_r_mean"]
        evaluated_at_start = bool(resume["metrics"])
        print(f"resumed from {args.resume} at iteration {start_it}")

    run = start_run(args, "distill", directory=str(files.dir))
    inputs = inputs_from_args(args, data, student_model, device, progress=args.progress, need_train=False)
    print(f"distilling {args.num_queries} pairs from {len(experts.files)} expert files in {directory} on {device}; "
          f"saving to {files.dir}")

    def save(path: Path, iteration: int, metrics: dict) -> None:
        state = {"optimizers": distiller.state(), "rng": rng_state(generator), "experts": experts.state(),
                 "best_r_mean": best_r_mean, "timing": dict(timing), "guard": distiller.guard.state()}
        similarity = distiller.similarity_matrix()
        extra = {} if similarity is None else {"similarity": similarity,
                                                "sim_params": [t.detach().cpu() for t in distiller.sim_params]}
        save_distilled_set(path, distiller.image_syn, distiller.text_syn, distiller.syn_lr_img.item(),
                           distiller.syn_lr_txt.item(), iteration, config, metrics, state, **extra)

    def evaluate_and_save(iteration: int) -> None:
        nonlocal best_r_mean
        lr = distiller.syn_lr_img.item()
        summary = evaluate_pairs(args, distiller.image_syn, distiller.text_syn, lr, inputs, device,
                                 args.num_eval, seed=args.seed + 1_000_003 + iteration, progress=args.progress,
                                 similarity=distiller.similarity_matrix(), model=student_model)
        tqdm.write(f"iteration {iteration}: {format_summary(summary)}  (eval lr {lr:.4g}, {args.num_eval} models, "
                   f"{args.eval_split}; {distiller.guard.total_skipped} steps skipped so far)")
        run.log({**{f"eval/{k}": v["mean"] for k, v in summary.items()},
                 **{f"eval/{k}_std": v["std"] for k, v in summary.items()}}, step=iteration)
        improved = summary["r_mean"]["mean"] > best_r_mean
        best_r_mean = max(best_r_mean, summary["r_mean"]["mean"])
        save(files.at(iteration), iteration, summary)
        save(files.last, iteration, summary)
        if improved:
            save(files.best, iteration, summary)
        if args.draw:
            draw(iteration)

    def draw(iteration: int) -> None:
        grids = save_image_grids(distiller.image_syn, files.dir, f"{iteration:06d}")
        nearest = nearest_captions(distiller.text_syn, data.train_text, data.train.captions)
        write_nearest_captions(nearest, files.dir / f"nearest_captions_{iteration:06d}.txt")
        if args.wandb_mode != "disabled":
            import wandb
            run.log({"Synthetic_Images": wandb.Image(str(grids["plain"])),
                     "Clipped_Synthetic_Images": wandb.Image(str(grids["clipped"])),
                     "Nearest_Captions": wandb.Table(columns=["index", "cosine", "caption"],
                                                     data=[[i, s, c] for i, (c, s) in enumerate(nearest)])},
                    step=iteration)

    completed = start_it
    started = time.time()
    # Time spent in matching iterations alone (no evaluations), kept across --resume.
    timing = dict(resume["state"].get("timing", {"seconds": 0.0, "iterations": 0})) if resume else \
        {"seconds": 0.0, "iterations": 0}
    bar = tqdm(range(start_it, args.Iteration), desc="distill", unit="it", disable=not args.progress)
    try:
        for iteration in bar:
            if iteration % args.eval_it == 0 and not (iteration == start_it and evaluated_at_start):
                evaluate_and_save(iteration)
            began = time.perf_counter()
            stats = distiller.step(experts, generator, iteration)
            timing["seconds"] += time.perf_counter() - began
            timing["iterations"] += 1
            completed = iteration + 1
            skipped = stats.pop("skipped")
            if skipped:
                tqdm.write(f"iteration {iteration}: step skipped: {skipped}")
            run.log({**stats, "Skipped_Steps": distiller.guard.total_skipped}, step=iteration)
            bar.set_postfix(loss=f"{stats['Grand_Loss']:.4f}", lr_img=f"{stats['Synthetic_LR_Image']:.4g}",
                            lr_txt=f"{stats['Synthetic_LR_Text']:.4g}", skipped=distiller.guard.total_skipped)
            if args.time_budget and time.time() - started > 60 * args.time_budget and completed < args.Iteration:
                tqdm.write(f"--time_budget {args.time_budget:g} min reached after iteration {completed}: stopping")
                break
        if not (completed == start_it and evaluated_at_start):
            evaluate_and_save(completed)
    except NonFiniteLoss as err:
        save(files.last, err.iteration, {})  # the state before the step that diverged
        raise UserError(f"{err}; stopped. The last good distilled set is {files.last} (iteration {err.iteration}); "
                        f"continue from it with --resume and lower --lr_img/--lr_txt/--lr_lr or --syn_steps") from None
    except KeyboardInterrupt:
        save(files.last, completed, {})
        print(f"\ninterrupted: saved iteration {completed} to {files.last}; continue with --resume {files.last}")
        raise
    run.finish()
    per_iteration = timing["seconds"] / max(timing["iterations"], 1)
    skipped = distiller.guard.skipped
    print(f"done: {completed - start_it} iterations in {time.time() - started:.0f}s "
          f"({per_iteration:.2f}s per matching iteration); {distiller.guard.total_skipped} steps skipped"
          f"{' (' + ', '.join(f'{n} {k}' for k, n in skipped.items()) + ')' if skipped else ''}; best r_mean on "
          f"{args.eval_split} {best_r_mean:.2f} -> {files.best}; last -> {files.last}")
    return 0


def cli() -> None:
    """Entry point of the installed command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
