"""The random streams that draw an update's expert segments (`--trajectories_per_iteration`, torchrun).

One update averages the meta-gradients of S = K x M segments: K processes, M segments each. Segment
slot s = rank x M + m has a stream of its own: a generator for every random draw of its segment (start
epoch, minibatches, augmentation, blends, dropout) and its own expert cycler (the order the expert files
are visited in). Slot 0 is the run's own generator and cycler, so a single process with M = 1 draws
exactly what distill.py always drew; slot s >= 1 starts from a seed of its own (utils/seeds.py).

Slots are numbered over the whole run, not per process: K processes with M segments each and one
process with K x M segments draw the same segments, and a run saved by one is resumed by the other
with the very same streams. Resumed with another S, the slots both runs have continue where they were
and new ones start fresh, so the draws then differ from an uninterrupted run's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from experts.cycler import ExpertCycler
from utils.distributed import ProcessGroupInfo, gather_objects
from utils.rng import restore_rng, rng_state


@dataclass
class SegmentStream:
    slot: int
    generator: torch.Generator
    experts: ExpertCycler

    def state(self) -> dict:
        return {"rng": rng_state(self.generator), "experts": self.experts.state()}


def saved_streams(state: dict) -> list[dict]:
    """Every slot's stream in a saved run state: slot 0 in `rng`/`experts` (the layout of single-stream
    files), slots 1.. in `streams`."""
    return [{"rng": state["rng"], "experts": state["experts"]}, *state.get("streams", [])]


def streams_entries(streams: list[dict]) -> dict:
    """The saved-state entries for every slot's stream (the inverse of `saved_streams`)."""
    first, *others = streams
    return {"rng": first["rng"], "experts": first["experts"], **({"streams": others} if others else {})}


class SegmentStreams:
    """This process's segment streams, and the state of every process's streams (for saving)."""

    def __init__(self, group: ProcessGroupInfo, per_process: int, first: SegmentStream,
                 make: Callable[[int, int], SegmentStream]):
        """`first`: slot 0's stream (the run's own); `make(slot, iteration)`: a fresh stream for another slot."""
        self.group, self.per_process, self.make = group, per_process, make
        self.total = group.world_size * per_process
        slots = range(group.rank * per_process, (group.rank + 1) * per_process)
        self.local = [first if slot == 0 else make(slot, 0) for slot in slots]

    def state(self) -> list[dict]:
        """Every slot's stream state, in slot order, on every process (a collective under torchrun)."""
        return [entry for states in gather_objects([s.state() for s in self.local], self.group) for entry in states]

    def restore(self, saved: list[dict], iteration: int) -> str | None:
        """Continue every slot the saved run had; start the others fresh at `iteration`. Returns a note when
        the saved run drew another number of segments per update (its random draws then differ)."""
        for position, stream in enumerate(self.local):
            if stream.slot < len(saved):
                entry = saved[stream.slot]
                if stream.slot == 0:
                    restore_rng(entry["rng"], stream.generator)  # the global streams too, as single runs do
                else:
                    stream.generator.set_state(entry["rng"]["generator"])
                stream.experts.restore(entry["experts"])
            else:
                self.local[position] = self.make(stream.slot, iteration)
        if len(saved) == self.total:
            return None
        return (f"the file's run drew {len(saved)} segment(s) per update, this one draws {self.total} "
                f"({self.group.world_size} process(es) x {self.per_process}): "
                + (f"segment streams {len(saved)}..{self.total - 1} start fresh; " if self.total > len(saved) else
                   f"segment streams {self.total}..{len(saved) - 1} are dropped; ")
                + "the random draws from here on differ from an uninterrupted run's")
