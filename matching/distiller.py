"""The learned state of a distillation run and one trajectory-matching update on it.

`Distiller` owns what a run learns: the synthetic images and text embeddings, the two step sizes the
students take (image side, text head), a learned target similarity's parameters (LoRS), and one SGD
optimiser (momentum 0.5) per group. `step` draws one expert segment per stream, takes the matching
loss's meta-gradient, averages it over the streams and the processes, and applies it unless the step
guard refuses it (matching/guard.py); `learned_copy` and `restore` copy that state out and back in (the
format of a saved set's learned part, docs/file-formats.md). A run that skips too many steps in a row
raises `Diverged`.
"""
from __future__ import annotations

import copy
import math
import time

import torch

from matching.encoders import Arm, scheduled_arms
from matching.guard import StepGuard
from matching.meta_gradient import matching_gradients
from matching.streams import SegmentStream
from matching.trajectory import Students, contrastive_step_loss, draw_blends, draw_minibatches, FrozenPass, pick_segment
from networks import image_norm
from networks.similarity import TargetSimilarity
from settings.programs import DistillRunSettings
from utils.cli import UserError
from utils.distributed import ProcessGroupInfo, sum_over_ranks
from utils.dsa import dsa_augment
from utils.rng import global_streams_seeded
from utils.seeds import similarity_init_seed


class Distiller:
    """The learned state of a run (pixels, text embeddings, step sizes, a similarity's parameters) and
    one trajectory-matching iteration on it."""

    def __init__(self, settings: DistillRunSettings, images: torch.Tensor, texts: torch.Tensor, device: torch.device,
                 students: Students, group: ProcessGroupInfo | None = None, extra_arms: list[Arm] = ()):
        self.settings, self.device, self.students = settings, device, students
        # the encoders the set is distilled for (matching/encoders.py): --image_encoder's student first
        self.norm = image_norm(settings.model)  # the pixels' normalisation (--image_encoder's)
        self.arms = [Arm(settings.model.image_encoder, students, self.norm), *extra_arms]
        self.group = group or ProcessGroupInfo()
        self.sync_seconds = 0.0  # time spent averaging the meta-gradients over the processes (torchrun)
        self.image_syn = images.to(device).requires_grad_(True)
        self.text_syn = texts.to(device).requires_grad_(True)
        self.syn_lr_img = torch.tensor(float(settings.distill.student_lr_img), device=device, requires_grad=True)
        self.syn_lr_txt = torch.tensor(float(settings.distill.student_lr_txt), device=device, requires_grad=True)
        self.similarity = TargetSimilarity(settings.distill.sim_type, settings.distill.num_pairs,
                                           settings.distill.sim_rank, settings.distill.sim_alpha) if settings.distill.sim_type != "none" else None
        # The similarity's initial parameters (LoRS's random L) come from a generator of their own, not the run's:
        # the run then draws the same segments, minibatches and augmentations whatever --sim_type, so a run with a
        # similarity is paired with the same run without (and S = I held fixed learns exactly what the base method
        # learns). A resumed run draws them again, then `restore` puts back the saved ones.
        own = torch.Generator().manual_seed(similarity_init_seed(settings.runtime.seed))
        self.sim_params = ([t.requires_grad_(True) for t in self.similarity.initial_params(own, device)]
                           if self.similarity else [])
        self.optimizers = {
            "img": torch.optim.SGD([self.image_syn], lr=settings.distill.lr_img, momentum=0.5),
            "txt": torch.optim.SGD([self.text_syn], lr=settings.distill.lr_txt, momentum=0.5),
            "lr": torch.optim.SGD([self.syn_lr_img, self.syn_lr_txt], lr=settings.distill.lr_lr, momentum=0.5),
        }
        if self.sim_params:
            self.optimizers["sim"] = torch.optim.SGD(self.sim_params, lr=settings.distill.lr_sim, momentum=0.5)
        self.guard = StepGuard(settings.distill.skip_spikes, max_consecutive=settings.distill.max_skips)

    def augment(self, seed_base: int):
        if not self.settings.protocol.dsa:
            return None
        return lambda images, step: dsa_augment(images, self.settings.protocol.dsa_strategy, seed_base + step)

    def similarity_matrix(self) -> torch.Tensor | None:
        """The learned N x N target similarity (None: identity)."""
        return None if self.similarity is None else self.similarity.submatrix(self.sim_params).detach()

    def step(self, streams: list[SegmentStream], iteration: int, before: dict | None = None) -> dict:
        """One matching iteration: the meta-gradients of one segment per stream, averaged over the streams and
        (under torchrun) over the processes, applied, or skipped with the learned state as it was (`before`, a
        `learned_copy` of the state now, is what a refused step goes back to). Every process ends with the same
        state: each applies the same averaged gradient."""
        total, start_epochs = None, []
        for stream in streams:
            start_epoch, parts = self._segment_gradient(stream, iteration)
            total = parts if total is None else [a + b for a, b in zip(total, parts)]
            start_epochs.append(start_epoch)
        began = time.perf_counter()
        total = sum_over_ranks(total, self.group)
        self.sync_seconds += time.perf_counter() - began
        count = len(streams) * self.group.world_size
        image_term, text_term, *gradients = [t / count for t in total]
        return self._apply(image_term, text_term, gradients, start_epochs[0], iteration, before)

    def _segment_gradient(self, stream: SegmentStream, iteration: int) -> tuple[int, list[torch.Tensor]]:
        """The start epoch of the segment `stream` draws, and its matching loss's two terms and gradients (pixels,
        texts, both step sizes, similarity); with several encoders, the mean over the arms the schedule gives
        (matching/encoders.py). Every random number comes from the stream's generator: the global streams
        (dropout in the students) are seeded from it for the step and put back after."""
        settings, generator = self.settings, stream.generator
        chosen = scheduled_arms(len(self.arms), settings.distill.encoder_schedule, iteration, stream.slot)
        total, start_epoch = None, None
        for index in chosen:
            image_traj, text_traj = stream.experts.next(index) if len(self.arms) > 1 else stream.experts.next()
            segment = pick_segment(image_traj, text_traj, settings.distill.max_start_epoch, settings.distill.expert_epochs, generator, self.device)
            batches = draw_minibatches(settings.distill.num_pairs, settings.distill.mini_batch_size, settings.distill.syn_steps, generator)
            augment = self.augment(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            blends = draw_blends(settings.distill.syn_steps, settings.distill.mini_batch_size, settings.distill.blend_alpha, generator) \
                if settings.distill.blend_alpha > 0 else None
            streams_seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
            with global_streams_seeded(streams_seed, self.device):
                result, image_grad = self._meta_gradient(self.arms[index], segment, batches, augment, blends)
            _, text_grad, *sim_grads = result.learned_grads
            parts = [result.image_term, result.text_term, image_grad, text_grad, result.lr_img_grad, result.lr_txt_grad,
                     *sim_grads]
            total = parts if total is None else [a + b for a, b in zip(total, parts)]
            start_epoch = segment.start_epoch if start_epoch is None else start_epoch
        return start_epoch, total if len(chosen) == 1 else [t / len(chosen) for t in total]

    def _meta_gradient(self, arm: Arm, segment, batches, augment, blends):
        """The matching loss's meta-gradient through `arm`'s student, with the pixels' part taken back through its
        frozen trunk and its normalisation."""
        settings, students = self.settings, arm.students
        pixels = self.image_syn if arm.norm == self.norm else arm.pixels(self.image_syn, self.norm)
        # A frozen trunk runs once per iteration on the synthetic images this iteration's minibatches hold (one
        # augmentation draw when DSA is on); the student steps then see its outputs, and their gradient flows
        # back through it (and the normalisation) at the end.
        features_given = students.frozen_encoder is not None
        if features_given:
            trunk = FrozenPass(students.frozen_encoder, pixels if augment is None else augment(pixels, 0), batches)
            image_input = trunk.features.requires_grad_(True)
            augment = None
        else:  # the student takes the pixels; in another normalisation, as a leaf of their own
            image_input = pixels if pixels is self.image_syn else pixels.detach().requires_grad_(True)
        step_loss = contrastive_step_loss(students, batches, augment, self.similarity, settings.model.loss_type, blends,
                                          features_given)
        result = matching_gradients(settings.distill.matching, students, step_loss, len(batches),
                                    (image_input, self.text_syn, *self.sim_params), self.syn_lr_img,
                                    self.syn_lr_txt, segment)
        image_grad = result.learned_grads[0]
        if features_given:
            image_grad = trunk.pixel_gradient(self.image_syn, image_grad)
        elif pixels is not self.image_syn:
            image_grad = torch.autograd.grad(pixels, self.image_syn, image_grad)[0]
        return result, image_grad

    def _apply(self, image_term: torch.Tensor, text_term: torch.Tensor, gradients: list[torch.Tensor], start_epoch: int,
               iteration: int, before: dict | None) -> dict:
        """Apply the meta-gradient (pixels, texts, the two step sizes, the similarity's parameters) unless the
        guard refuses it or the step leaves a broken state."""
        terms = {"image": image_term.item(), "text": text_term.item()}
        stats = {"matching/loss": terms["image"] + terms["text"], "matching/image_loss": terms["image"],
                 "matching/text_loss": terms["text"], "matching/start_epoch": start_epoch}
        bad = [f"{name} term {value}" for name, value in terms.items() if not math.isfinite(value)]
        if bad:
            return self._skip(iteration, "non-finite matching loss (" + ", ".join(bad) + ")", stats)
        image_grad, text_grad, lr_img_grad, lr_txt_grad, *sim_grads = gradients
        norms = {"pixels": image_grad.norm().item(), "texts": text_grad.norm().item(),
                 "step sizes": torch.stack([lr_img_grad, lr_txt_grad]).norm().item()}
        if sim_grads:
            norms["similarity"] = math.sqrt(sum(g.pow(2).sum().item() for g in sim_grads))
        problem = self.guard.gradient_problem(norms)
        if problem:
            return self._skip(iteration, problem, stats)
        learned = (self.image_syn, self.text_syn, self.syn_lr_img, self.syn_lr_txt, *self.sim_params)
        for tensor, gradient in zip(learned, gradients):
            tensor.grad = gradient
        before = before if before is not None else self.learned_copy()
        for optimizer in self.optimizers.values():
            optimizer.step()
        problem = self.state_problem()
        if problem:
            self.restore(before)  # the state before this step: the last good one
            return self._skip(iteration, problem, stats)
        self.guard.applied(norms)
        return {**stats, "synthetic/lr_img": self.syn_lr_img.item(), "synthetic/lr_txt": self.syn_lr_txt.item(),
                "skipped": None}

    def state_problem(self) -> str | None:
        """What is wrong with the learned state after a step (None: nothing)."""
        for name, lr in (("syn_lr_img", self.syn_lr_img), ("syn_lr_txt", self.syn_lr_txt)):
            value = lr.item()
            if not value > 0:  # also catches NaN
                return f"step size not positive ({name} would become {value:.4g})"
        momenta = [(f"{name} momentum", buffer) for name, optimizer in self.optimizers.items()
                   for state in optimizer.state.values() for buffer in state.values() if torch.is_tensor(buffer)]
        similarity = self.similarity_matrix()
        for name, tensor in (("image_syn", self.image_syn), ("text_syn", self.text_syn),
                             *((f"similarity {i}", t) for i, t in enumerate(self.sim_params)),
                             *([("similarity matrix", similarity)] if similarity is not None else []), *momenta):
            if not torch.isfinite(tensor).all():
                return f"non-finite values ({name})"
        return None

    def _skip(self, iteration: int, reason: str, stats: dict) -> dict:
        """Leave the learned state as it was, count the skip, and stop after too many in a row."""
        self.guard.skip(reason)
        if self.guard.exhausted:
            raise Diverged(iteration, f"{self.guard.consecutive} steps in a row skipped, the last for {reason}")
        return {**stats, "synthetic/lr_img": self.syn_lr_img.item(), "synthetic/lr_txt": self.syn_lr_txt.item(),
                "skipped": reason}

    def state(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def learned_copy(self) -> dict:
        """The learned tensors, step sizes and optimiser states, copied to the CPU (the format `restore` takes;
        a copy kept on the CPU costs no accelerator memory during the next step)."""
        return copied_to_cpu({"image_syn": self.image_syn, "text_syn": self.text_syn,
                              "syn_lr_img": self.syn_lr_img.item(), "syn_lr_txt": self.syn_lr_txt.item(),
                              "sim_params": list(self.sim_params), "state": {"optimizers": self.state()}})

    def restore(self, payload: dict) -> None:
        """Put back a `learned_copy` (or the learned state of a saved set); ValueError when it does not fit this run.
        The optimisers keep this run's learning rates (a resumed run may lower them)."""
        problem = self.fit_problem(payload)
        if problem:
            raise ValueError(problem)
        with torch.no_grad():
            self.image_syn.copy_(payload["image_syn"])
            self.text_syn.copy_(payload["text_syn"])
            self.syn_lr_img.fill_(payload["syn_lr_img"])
            self.syn_lr_txt.fill_(payload["syn_lr_txt"])
            for tensor, saved in zip(self.sim_params, payload.get("sim_params", [])):
                tensor.copy_(saved)
        for name, optimizer in self.optimizers.items():
            rates = [group["lr"] for group in optimizer.param_groups]
            optimizer.load_state_dict(copy.deepcopy(payload["state"]["optimizers"][name]))  # no buffer shared
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate

    def fit_problem(self, payload: dict) -> str | None:
        """Why a saved learned state does not fit this run's tensors and optimisers (None: it fits)."""
        saved_sim = payload.get("sim_params", [])
        if len(saved_sim) != len(self.sim_params):
            return f"it holds {len(saved_sim)} similarity tensors, this run learns {len(self.sim_params)}"
        pairs = [("image_syn", payload["image_syn"], self.image_syn), ("text_syn", payload["text_syn"], self.text_syn),
                 *((f"sim_params[{i}]", saved, live) for i, (saved, live) in enumerate(zip(saved_sim, self.sim_params)))]
        for name, saved, live in pairs:
            if saved.shape != live.shape:
                return f"{name} has shape {tuple(saved.shape)}, this run's is {tuple(live.shape)}"
        states = payload["state"]["optimizers"]
        if set(states) != set(self.optimizers):
            return f"it has optimiser states {sorted(states)}, this run has {sorted(self.optimizers)}"
        for name, optimizer in self.optimizers.items():
            problem = optimizer_state_problem(optimizer, states[name])
            if problem:
                return f"optimiser state {name!r}: {problem}"
        return None


def copied_to_cpu(value):
    """`value` with every tensor inside it (through dicts, lists and tuples) copied to the CPU, detached."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: copied_to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copied_to_cpu(item) for item in value)
    return copy.deepcopy(value)


def optimizer_state_problem(optimizer: torch.optim.Optimizer, saved) -> str | None:
    """Why `saved` (an SGD state_dict) cannot continue `optimizer` (None: it can)."""
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list) and all(isinstance(g, dict) for g in saved["param_groups"])):
        return "not an optimiser state (state and param_groups)"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group.get("params", [])]
    if len(saved["param_groups"]) != len(optimizer.param_groups) or len(ids) != len(params):
        return f"{len(ids)} parameters in {len(saved['param_groups'])} groups, this run has {len(params)}"
    by_id = dict(zip(ids, params))
    for key, entry in saved["state"].items():
        if key not in by_id or not isinstance(entry, dict):
            return f"a state for parameter {key!r}, which this run does not have"
        buffer, param = entry.get("momentum_buffer"), by_id[key]
        if buffer is not None and not (isinstance(buffer, torch.Tensor) and buffer.is_floating_point()
                                       and buffer.shape == param.shape):
            found = tuple(buffer.shape) if isinstance(buffer, torch.Tensor) else type(buffer).__name__
            return f"momentum of shape {found} for parameter {key!r} of shape {tuple(param.shape)}"
    return None


class Diverged(UserError):
    """Distillation diverged: too many steps in a row were skipped as non-finite, spikes or leaving a step
    size that is not positive."""

    def __init__(self, iteration: int, detail: str):
        super().__init__(f"distillation diverged at iteration {iteration} ({detail})")
        self.iteration = iteration
