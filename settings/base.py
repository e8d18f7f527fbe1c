"""The machinery behind the typed settings: one dataclass field = one flag = one TOML key.

A settings class is a dataclass whose fields are declared with `setting(...)`: the default, the help
text, the allowed values and the check live there once. From it come

- the command-line flags (`add_arguments`: `--name` plus any aliases, the type from the annotation,
  booleans as `--name True|False` with a bare `--name` meaning True);
- the object built from a parsed command line (`from_namespace`) or from a TOML table / a saved
  configuration (`from_mapping`: an unknown key is an error naming the nearest valid one, a value of
  the wrong type is an error naming the key), checked in one place (`validate`);
- its serialisation (`to_dict`), which is what runs save as their flat configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from utils.cli import UserError, str2bool, suggestion

Check = Callable[[Any], str | None]  # returns what is wrong with a value, or None

# The names fields had in earlier versions of this project -> their names now. On the command line and in TOML
# the old names are the fields' aliases; files written before a rename (a set's or a report's config, a partial
# expert's settings, a pipeline stage's stamp) are read through this map (`current_names`).
RENAMED = {"num_queries": "num_pairs", "Iteration": "iterations", "mom": "expert_momentum",
           "l2": "expert_weight_decay", "batch_train": "eval_batch"}


def current_names(config: Mapping[str, Any]) -> dict[str, Any]:
    """A saved flat configuration with the keys renamed since it was written under their names now."""
    return {RENAMED.get(key, key): value for key, value in config.items()}


@dataclasses.dataclass(frozen=True)
class Computed:
    """A default worked out each time a settings object is made or a command line parsed (from the clock, the
    environment), not once when the module is imported: `setting(Computed(function), ...)`."""
    make: Callable[[], Any]


def setting(default: Any, help: str, *, aliases: Iterable[str] = (), choices: Iterable | None = None,
            check: Check | None = None, parse: Callable[[str], Any] | None = None, metavar: str | None = None):
    """A field of a settings class: its default (a value, or `Computed`), help text, accepted other flag names
    (`aliases`, e.g. the reference implementation's), allowed values and a check run by `validate`."""
    metadata = {"help": help, "aliases": tuple(aliases), "choices": None if choices is None else tuple(choices),
                "check": check, "parse": parse, "metavar": metavar}
    if isinstance(default, Computed):
        return dataclasses.field(default_factory=default.make, metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# Upper ends of the learning rates: the synthetic pixels, text embeddings and similarity move by large steps
# (the reference's --lr_img is 1000), network weights and the learned step sizes by small ones (0.1).
DATA_LR_MAX = 1e6
WEIGHT_LR_MAX = 100.0

# Checks, each returning what is wrong or None; `allowed` says what is accepted, in the flag's --help.
# Numbers must be finite: float flags also parse "nan" and "inf".
def _finite(v) -> bool:
    return not isinstance(v, float) or math.isfinite(v)  # (ints are; math.isfinite overflows on huge ones)


def described(check: Check, allowed: str) -> Check:
    """`check` with the description of what it accepts that --help shows."""
    def described_check(v) -> str | None:
        return check(v)
    described_check.allowed = allowed
    return described_check


def one_of(names: tuple[str, ...]) -> Check:
    """A value among `names` (the check of a list's elements, where `choices` applies to a single value)."""
    return described(lambda v: None if v is None or v in names else f"{v!r} is not one of {', '.join(names)}",
                     f"one of {', '.join(names)}")


def _check(allowed: str, ok: Callable[[Any], bool], problem: str) -> Check:
    return described(lambda v: None if v is None or ok(v) else problem, allowed)


INT64_MAX = 2**63 - 1  # beyond it a count overflows as soon as torch or numpy sees it


def at_least(low: float, most: int = INT64_MAX) -> Check:
    """A number from `low` to `most` (a count: by default anything torch can hold)."""
    def check(v) -> str | None:
        if v is None or (_finite(v) and low <= v <= most):
            return None
        return f"must be at least {low:g}" if not v >= low else \
            f"must be at most {most}" + (" (2**63 - 1)" if most == INT64_MAX else "")
    return described(check, f">= {low:g}" if most == INT64_MAX else f"{low:g} to {most}")


# A contrastive batch (and a set or split trained contrastively) needs 2 pairs: over one, InfoNCE's only logit is
# its own target, so the loss is 0 whatever the weights and nothing trains.
MIN_PAIRS = 2
pair_count = at_least(MIN_PAIRS)  # the check of every batch size (and set size) that feeds a contrastive loss


positive = _check("> 0", lambda v: _finite(v) and v > 0, "must be positive (and finite)")
non_negative = _check(">= 0", lambda v: _finite(v) and v >= 0, "must be 0 or positive (and finite)")


non_empty = described(lambda v: None if v is None or v.strip() else "must not be empty", "not empty")

MAX_NAME_BYTES = 255  # the longest file name that common file systems (ext4, APFS, NTFS) take
MAX_PATH_BYTES = 4095  # Linux's PATH_MAX less the closing NUL


def path_problem(v) -> str | None:
    """What keeps `v` from naming a file or folder on any system (before the system is asked), or None."""
    if v is None:
        return None
    if not v.strip():
        return "must not be empty"
    if "\0" in v:
        return "holds a NUL byte, which no path can contain"
    try:
        encoded = os.fsencode(v)
    except UnicodeEncodeError:
        return "holds characters that cannot be a file name"
    if len(encoded) > MAX_PATH_BYTES:
        return f"is {len(encoded)} bytes long, more than a path may be ({MAX_PATH_BYTES})"
    if any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        return f"has a file or folder name longer than {MAX_NAME_BYTES} bytes"
    return None


a_path = described(path_problem, f"a path: not empty, no NUL byte, names of at most {MAX_NAME_BYTES} bytes")


def positive_up_to(high: float) -> Check:
    """A finite number in (0, high]: learning rates, whose sane ranges differ by orders of magnitude between
    pixels (the reference's 1000) and network weights (0.1)."""
    return _check(f"> 0 and <= {high:g}", lambda v: _finite(v) and 0 < v <= high,
                  f"must be positive and at most {high:g} (a finite number)")


def in_interval(low: float, high: float, *, high_included: bool = True) -> Check:
    """A finite number in [low, high] (or [low, high) when `high_included` is false)."""
    below = (lambda v: v <= high) if high_included else (lambda v: v < high)
    return _check(f">= {low:g} and {'<=' if high_included else '<'} {high:g}",
                  lambda v: _finite(v) and low <= v and below(v),
                  f"must be from {low:g} to {high:g}" + ("" if high_included else f" ({high:g} excluded)"))


def each(check: Check) -> Check:
    """A check of a list: not empty, and every element passes `check`."""
    def check_all(values) -> str | None:
        if values is None:
            return None
        if not values:
            return "needs at least one value"
        problems = [check(v) for v in values if check(v)]
        return f"{problems[0]}, each of them" if problems else None
    check_all.allowed = f"each {getattr(check, 'allowed', '')}".strip()
    return check_all


def _base_type(annotation) -> tuple[type, bool, bool]:
    """(element type, optional, list) of a field annotation such as `int | None` or `list[float] | None`."""
    args = typing.get_args(annotation)
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        optional = len(members) < len(args)
        annotation = members[0] if len(members) == 1 else annotation
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], optional, True
    return annotation, optional, False


def _accepts(kind: type, value) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return True


def _holds_type(annotation, value) -> bool:
    """Whether `value` is of a field's annotated type (`int | None`, `list[float]`, `str | int | None`, ...)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_holds_type(member, value) for member in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if typing.get_origin(annotation) is list:
        return isinstance(value, list) and all(_accepts(typing.get_args(annotation)[0], v) for v in value)
    return _accepts(annotation, value)


def _type_words(annotation) -> str:
    kind, optional, many = _base_type(annotation)
    name = getattr(kind, "__name__", str(kind).replace(" | ", " or ").replace(" or None", ""))
    return f"{'one or more ' if many else 'a '}{name} value{'s' if many else ''}"


class Settings:
    """Base of the settings dataclasses (see the module docstring)."""

    title: ClassVar[str] = "settings"

    @classmethod
    def specs(cls) -> list[dataclasses.Field]:
        """The fields, their `type` resolved from the annotation text (once per class: validate runs it often)."""
        if "_resolved_fields" not in cls.__dict__:
            hints = typing.get_type_hints(cls)
            fields = dataclasses.fields(cls)
            for f in fields:
                f.type = hints[f.name]
            cls._resolved_fields = fields
        return list(cls._resolved_fields)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def aliases(cls) -> dict[str, str]:
        """Other accepted key / flag name -> field name."""
        return {alias.lstrip("-"): f.name for f in dataclasses.fields(cls) for alias in f.metadata["aliases"]}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None,
                      skip: Iterable[str] = (), title: str | None = None, given_only: bool = False) -> None:
        """One flag per field (program-specific `defaults` replace the field defaults). With `given_only` no
        flag has a default (argparse.SUPPRESS): the parsed namespace holds just what the command line gives."""
        defaults, skip = dict(defaults or {}), set(skip)
        group = parser.add_argument_group(title or cls.title)
        for f in cls.specs():
            if f.name in skip:
                continue
            kind, optional, many = _base_type(f.type)
            meta = f.metadata
            default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
            kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS if given_only else default,
                                      "help": help_text(f)}
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            if kind is bool and not many:
                kwargs.update(type=str2bool, nargs="?", const=True, metavar=meta["metavar"] or "True|False")
            else:
                kwargs["type"] = meta["parse"] or kind
                if many:
                    kwargs["nargs"] = "+"
            group.add_argument(*flag_names(f), **kwargs)

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace, **overrides):
        """The settings held by a parsed command line (fields the parser did not define keep their defaults)."""
        values = {name: getattr(namespace, name) for name in cls.names() if hasattr(namespace, name)}
        return cls(**{**values, **overrides}).validate()

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], where: str, known: Iterable[str] = ()):
        """The settings of a TOML table or a saved configuration; keys in `known` belong to others and are
        ignored, any other unknown key is an error naming the nearest valid key."""
        aliases, names, values = cls.aliases(), cls.names(), {}
        specs = {f.name: f for f in cls.specs()}
        for key, value in mapping.items():
            name = aliases.get(key, key)
            if name not in specs:
                if key in set(known):
                    continue
                raise UserError(f"{where}: unknown key {key!r}" + suggestion(key, [*names, *aliases], names))
            values[name] = coerce(specs[name], value, where, key)
        return cls(**values).validate()

    @classmethod
    def from_saved(cls, config: Mapping[str, Any], where: str = "saved configuration"):
        """This group's settings from a saved flat configuration (a set file's `config`), ignoring the keys
        of other groups."""
        keys = {*cls.names(), *cls.aliases()}
        return cls.from_mapping({k: v for k, v in config.items() if k in keys}, where)

    def validate(self):
        """Every field's allowed values and check, then the class's own rules (`check`); returns self."""
        for f in self.specs():
            if not _holds_type(f.type, getattr(self, f.name)):  # e.g. argparse makes `--flag=--` an empty list
                raise UserError(f"--{f.name} needs {_type_words(f.type)}, got {getattr(self, f.name)!r}")
            problem = value_problem(f, getattr(self, f.name))
            if problem:
                raise UserError(f"--{f.name} {problem}")
        self.check()
        return self

    def check(self) -> None:
        """Rules between fields (overridden by the classes that have some)."""

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}


def flag_names(f: dataclasses.Field) -> list[str]:
    """The command-line flags of a field: `--name`, then its aliases."""
    return [f"--{f.name}", *(a if a.startswith("-") else f"--{a}" for a in f.metadata["aliases"])]


def help_text(f: dataclasses.Field) -> str:
    """A field's --help text: its description and, where it has a check, what the check accepts."""
    allowed = getattr(f.metadata["check"], "allowed", None)
    return f.metadata["help"] + (f" (allowed: {allowed})" if allowed else "")


def value_problem(f: dataclasses.Field, value) -> str | None:
    """What is wrong with `value` for the field `f` (its allowed values, then its check), or None; the text
    follows the flag or key name in a message."""
    meta = f.metadata
    if meta["choices"] is not None and value is not None and value not in meta["choices"]:
        return f"{value!r} is not one of {', '.join(map(str, meta['choices']))}"
    problem = meta["check"](value) if meta["check"] is not None else None
    return f"{problem}, got {value!r}" if problem else None


def coerce(f: dataclasses.Field, value, where: str, key: str):
    """A TOML / JSON value as the field's type (ints accepted for floats, "all"-style values through `parse`)."""
    kind, optional, many = _base_type(f.type)
    if value is None and optional:
        return None
    if many:
        if not isinstance(value, list) or not all(_accepts(kind, v) for v in value):
            raise UserError(f"{where}: {key} must be a list of {kind.__name__} values, got {value!r}")
        return [kind(v) for v in value]
    if f.metadata["parse"] is not None:
        try:
            return f.metadata["parse"](str(value))
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise UserError(f"{where}: {key}: {err}") from None
    if not _accepts(kind, value):
        raise UserError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
    return kind(value) if kind in (int, float) else value


def flatten(*groups: Settings) -> dict[str, Any]:
    """One flat configuration (flag name -> value) of several settings groups."""
    out: dict[str, Any] = {}
    for group in groups:
        out.update(group.to_dict())
    return out
