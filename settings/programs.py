"""Which settings groups each program takes, its command line built from them, and the parsed bundle.

`parse(program, argv)` is the one place where a command line becomes typed settings: every group is
built from the flags and validated before any work starts. The pipeline's TOML sections are checked
against the same groups (`check_section`), so a key means the same thing, has the same default and
passes the same check wherever it is written.
"""
from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from dataclasses import dataclass, fields

from settings.base import Settings, coerce, flag_names, flatten, help_text, value_problem
from settings.data import DataSettings
from settings.distillation import DistillSettings
from settings.experts import ExpertSettings
from settings.judging import CoresetSettings, JudgingSettings, TargetSettings
from settings.model import ModelSettings
from settings.protocol import ProtocolSettings
from settings.reduction import ReductionSettings
from settings.runtime import RuntimeSettings
from utils.cli import UserError, suggestion


@dataclass
class ProgramSettings:
    """The settings of one program run, one typed group per concern."""

    def groups(self) -> list[Settings]:
        return [getattr(self, f.name) for f in fields(self)]

    def flat_config(self) -> dict:
        """The flat configuration (flag name -> value) saved with everything the run writes."""
        return flatten(*self.groups())

    def data_paths(self) -> dict[str, str | None]:
        """The files and folders every program reads (flag -> path, None when not given): the data, the
        annotations, the image encoder's checkpoint, a local text model."""
        data, model = self.data, self.model
        annotations = ("--ann_root", data.ann_root) if data.ann_root else (
            "the annotation folder (--ann_root, default IMAGE_ROOT/annotations)",
            str(Path(data.image_root) / "annotations") if data.image_root else None)
        return {"--image_root": data.image_root, annotations[0]: annotations[1], "--image_weights": model.image_weights,
                "--text_model": model.text_model}


@dataclass
class BufferSettings(ProgramSettings):
    data: DataSettings
    model: ModelSettings
    experts: ExpertSettings
    runtime: RuntimeSettings


@dataclass
class DistillRunSettings(ProgramSettings):
    data: DataSettings
    model: ModelSettings
    distill: DistillSettings
    protocol: ProtocolSettings
    runtime: RuntimeSettings


@dataclass
class EvaluateSettings(ProgramSettings):
    target: TargetSettings
    judging: JudgingSettings
    coreset: CoresetSettings
    data: DataSettings
    model: ModelSettings
    protocol: ProtocolSettings
    runtime: RuntimeSettings


@dataclass
class ReduceSettings(ProgramSettings):
    reduction: ReductionSettings
    data: DataSettings
    model: ModelSettings
    runtime: RuntimeSettings


PROGRAMS: dict[str, type[ProgramSettings]] = {"buffer": BufferSettings, "distill": DistillRunSettings,
                                              "evaluate": EvaluateSettings, "reduce": ReduceSettings}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with the project's one way of reporting a user mistake: a one-line `error: ...`, exit 2."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def group_classes(program: str) -> dict[str, type[Settings]]:
    """The program's settings groups by name, in the order its --help lists them."""
    return typing.get_type_hints(PROGRAMS[program])

def build_parser(program: str, description: str, prog: str | None = None, given_only: bool = False) -> Parser:
    """The program's command line; with `given_only` its flags have no defaults, so that a parsed namespace
    holds only the flags given (`Settings.add_arguments`)."""
    parser = Parser(description=description, formatter_class=HelpFormatter, prog=prog or f"{program}.py")
    for cls in group_classes(program).values():
        cls.add_arguments(parser, given_only=given_only)
    return parser


def from_namespace(program: str, namespace: argparse.Namespace) -> ProgramSettings:
    """The typed, validated settings of a parsed command line."""
    groups = {name: cls.from_namespace(namespace) for name, cls in group_classes(program).items()}
    return PROGRAMS[program](**groups)


def parse(program: str, description: str, argv=None) -> ProgramSettings:
    parser = build_parser(program, description)
    return from_namespace(program, parser.parse_args(sys.argv[1:] if argv is None else list(argv)))


def parse_command_line(program: str, description: str, argv=None) -> tuple[argparse.Namespace, frozenset[str]]:
    """The parsed command line (every flag, defaults included) before it becomes settings, and the fields it
    sets itself: a program that also reads settings from a file lets the file fill in only the others."""
    argv = sys.argv[1:] if argv is None else list(argv)
    namespace = build_parser(program, description).parse_args(argv)
    given = build_parser(program, description, given_only=True).parse_args(argv)
    return namespace, frozenset(vars(given))


def flag_help(program: str, flag: str) -> str:
    """The --help text of one of the program's flags (`--name` or an alias)."""
    for cls in group_classes(program).values():
        for spec in cls.specs():
            if flag in flag_names(spec):
                return help_text(spec)
    raise KeyError(f"{program}.py has no flag {flag}")


def known_keys(program: str) -> dict[str, str]:
    """Every key (and alias) the program takes -> its canonical name."""
    out = {}
    for cls in group_classes(program).values():
        out.update({name: name for name in cls.names()})
        out.update(cls.aliases())
    return out


def check_section(program: str, section: dict, where: str, extra: tuple[str, ...] = ()) -> dict:
    """A TOML table of flags for `program`: unknown keys are errors naming the nearest valid key, values of the
    wrong type or outside the field's allowed values or range are errors naming the key; returns it with
    canonical key names (aliases resolved)."""
    keys = known_keys(program)
    specs = {f.name: f for cls in group_classes(program).values() for f in cls.specs()}
    out = {}
    for key, value in section.items():
        if key in extra:
            out[key] = value
            continue
        if key not in keys:
            raise UserError(f"{where}: unknown key {key!r} for {program}.py" + suggestion(key, [*keys, *extra]))
        field = specs[keys[key]]
        out[keys[key]] = coerce(field, value, where, key)
        problem = value_problem(field, out[keys[key]])
        if problem:
            raise UserError(f"{where}: {key} {problem}")
    return out


def check_together(program: str, section: dict, where: str, skip: tuple[str, ...] = ("target",)) -> None:
    """The rules between the flags of `program` (e.g. --mini_batch_size <= --num_pairs) on a checked section
    (`check_section`: canonical key names) that holds everything the program will be given; the groups in
    `skip` are left out (evaluate.py's target is added per call)."""
    for name, cls in group_classes(program).items():
        if name not in skip:
            try:
                cls(**{key: value for key, value in section.items() if key in cls.names()}).validate()
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
