"""Image-text pairs stored as webdataset tar shards, in the layout img2dataset writes.

A shard is a tar file whose members are grouped into samples by key: `dir/000123.jpg`, `dir/000123.txt` and
`dir/000123.json` are the image, the caption and the metadata of sample `dir/000123` (the key is the member
name up to the first dot of its last path component, as webdataset groups them; the members of one sample are
adjacent). Shards are read in tarfile's streaming mode, one member at a time, so that memory stays bounded by
one sample whatever the shard's size, and compressed shards (.tar.gz, ...) read as well as plain ones.

What can go wrong is reported as a one-line UserError that names the shard and the key: a damaged or truncated
shard (with the last sample that was read whole), a sample without its image or caption, an image that does not
decode. With `skip_bad` the problems that concern one sample skip it instead and are counted by kind; a damaged
shard is always an error, since the rest of it cannot be read.

The reduced set is written as a JSON list of kept keys per shard (`write_kept_keys`) and, on request, as new
shards holding only the kept samples with every member byte for byte (`write_shards`). Nothing here ever writes
over an input shard.
"""
from __future__ import annotations

import copy
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import UnbalancedBracesError, braceexpand
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data.captions import clean_caption
from data.datasets import problem_kind, to_rgb8
from utils.cli import UserError, os_error_reason
from utils.io import atomic_write_json, read_json_if_present, temporary_sibling

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample has several
CAPTION_EXTENSION = "txt"
META_EXTENSION = "json"

# The kinds of problem that skip one sample (with skip_bad), as `counts` and the messages name them.
NO_IMAGE = "no image"
NO_CAPTION = "no caption"
EMPTY_CAPTION = "empty caption"
BAD_CAPTION = "caption not UTF-8 text"
BAD_META = "invalid json"
UNDECODABLE_IMAGE = "undecodable image"
DUPLICATE_KEY = "duplicate key"

# The suffixes a shard's name may end with; stripped to name the outputs made from it.
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


class ShardError(UserError):
    """A shard that cannot be read on: damaged, truncated, not a tar file."""


class SampleProblem(UserError):
    """One sample that cannot be used; `kind` is one of the kinds above (what `skip_bad` counts)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Sample:
    """One image-text pair of a shard: the encoded image as stored (decode with `decode_image`), its file
    extension, the caption (stripped of surrounding white space; no other cleaning) and the parsed JSON
    metadata (None when the sample has no .json member)."""
    key: str
    image_bytes: bytes = field(repr=False)
    image_ext: str
    caption: str
    meta: dict | None = field(default=None, repr=False)


def expand_shards(pattern: str) -> list[str]:
    """The shard paths `pattern` names, in order: webdataset's brace notation (`data/{00000..00099}.tar`,
    `data/{a,b}.tar`), several patterns joined by `::`, or plain paths. Every path must be an existing file."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise UserError("no shards given: name tar files, e.g. data/{00000..00099}.tar")
    paths: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if not part:
            continue
        try:
            paths += [os.path.expanduser(path) for path in braceexpand(part)]
        except UnbalancedBracesError:
            raise UserError(f"the shard pattern {part!r} has unbalanced braces; write ranges as "
                            f"data/{{00000..00099}}.tar") from None
    if not paths:
        raise UserError(f"the shard pattern {pattern!r} names no file")
    seen: set[str] = set()
    repeated = [path for path in paths if path in seen or seen.add(path)]
    if repeated:
        raise UserError(f"the shard pattern {pattern!r} names {repeated[0]} more than once; name every shard once")
    bad = [path for path in paths if not os.path.isfile(path)]
    if bad:
        first = bad[0]
        what = "is a folder, not a tar file" if os.path.isdir(first) else "not found"
        raise UserError(f"{len(bad)} of the {len(paths)} shards named by {pattern!r} are missing or not files; "
                        f"the first: {first} ({what})")
    return paths


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name: the key is everything up to the first dot of the last path
    component, the extension (lower-cased) the rest; ('', '') for a name that webdataset would not group."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot or not extension:
        return "", ""
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def output_stem(shard) -> str:
    """The name of `shard` without its folder and its tar suffix (`a/00012.tar.gz` -> `00012`)."""
    name = Path(shard).name
    for suffix in _TAR_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _after(key: str | None) -> str:
    return f"after sample {key}" if key is not None else "before its first sample"


def _stream_ended_cleanly(path: Path, archive: tarfile.TarFile) -> bool:
    """Whether the archive ended on an end-of-archive block rather than simply stopping (tarfile stops without
    a word where a shard was cut at a member boundary). A plain tar is read again at that offset; for a
    compressed one the stream must at least have delivered a whole block there."""
    stream = archive.fileobj
    if getattr(stream, "comptype", "tar") == "tar":
        with open(path, "rb") as handle:
            handle.seek(archive.offset)
            return handle.read(tarfile.BLOCKSIZE) == _ZERO_BLOCK
    position = getattr(stream, "pos", None)
    return position is None or position - archive.offset >= tarfile.BLOCKSIZE


def iter_member_groups(path, *, read_data: bool = True) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """(key, [(member, bytes), ...]) for each run of adjacent regular-file members that share a key, in the
    shard's order; with `read_data=False` the bytes are empty (only the names are read). A damaged or truncated
    shard is a ShardError naming the last key read whole."""
    path = Path(path)
    last_good: str | None = None
    key: str | None = None
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, extension = split_member_name(member.name)
                if not member_key:
                    continue  # e.g. a README or a __key__ file without an extension: not part of a sample
                if member_key != key:  # the previous sample is whole
                    if key is not None:
                        last_good = key
                        yield key, members
                    key, members = member_key, []
                data = b""
                if read_data:
                    data = archive.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                members.append((member, data))
            if not _stream_ended_cleanly(path, archive):
                raise tarfile.ReadError("the archive stops without its end-of-archive blocks")
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:  # zlib/lzma errors are OSError or their own
        if isinstance(err, OSError) and err.filename is not None and not isinstance(err, tarfile.TarError):
            raise ShardError(f"shard {path} cannot be read: {os_error_reason(err)}") from None
        if isinstance(err, tarfile.ReadError) and last_good is None and key is None and "end of data" not in str(err) \
                and "end-of-archive" not in str(err):
            raise ShardError(f"shard {path} is not a tar file ({err}); check the path") from None
        reason = str(err).strip() or type(err).__name__
        raise ShardError(f"shard {path} is truncated or damaged {_after(last_good)} ({reason}); download it "
                         f"again or leave it out") from None
    if key is not None:
        yield key, members


def _decode_caption(data: bytes, path: Path, key: str) -> str:
    try:
        caption = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SampleProblem(f"the caption of sample {key} in shard {path} is not UTF-8 text", BAD_CAPTION) from None
    if not clean_caption(caption):
        raise SampleProblem(f"the caption of sample {key} in shard {path} is empty (no words)", EMPTY_CAPTION)
    return caption


def _decode_meta(data: bytes, path: Path, key: str) -> dict:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise SampleProblem(f"the metadata of sample {key} in shard {path} is not valid JSON", BAD_META) from None
    return meta if isinstance(meta, dict) else {"value": meta}


def _sample(path: Path, key: str, members: list[tuple[tarfile.TarInfo, bytes]]) -> Sample:
    """The Sample of one group of members, or the SampleProblem that keeps it from being one."""
    by_extension: dict[str, bytes] = {}
    for member, data in members:
        _, extension = split_member_name(member.name)
        if extension in by_extension:
            raise SampleProblem(f"shard {path} holds {member.name} twice", DUPLICATE_KEY)
        by_extension[extension] = data
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in by_extension), None)
    if image_ext is None:
        raise SampleProblem(f"sample {key} in shard {path} has no image (.{', .'.join(IMAGE_EXTENSIONS)}); found "
                            f".{', .'.join(sorted(by_extension))}", NO_IMAGE)
    if CAPTION_EXTENSION not in by_extension:
        raise SampleProblem(f"sample {key} in shard {path} has no caption (.{CAPTION_EXTENSION}); found "
                            f".{', .'.join(sorted(by_extension))}", NO_CAPTION)
    caption = _decode_caption(by_extension[CAPTION_EXTENSION], path, key)
    meta = _decode_meta(by_extension[META_EXTENSION], path, key) if META_EXTENSION in by_extension else None
    return Sample(key, by_extension[image_ext], image_ext, caption, meta)


def _count(counts: dict | None, kind: str) -> None:
    if counts is not None:
        counts[kind] = counts.get(kind, 0) + 1


def iter_shard(path, *, skip_bad: bool = False, counts: dict | None = None) -> Iterator[Sample]:
    """The samples of one shard, in order. A sample without image or caption, with an empty or non-UTF-8
    caption, invalid JSON metadata, or a key seen before in the shard is a SampleProblem naming shard and key;
    with `skip_bad` it is left out and counted in `counts` (kind -> number). Images are not decoded here
    (`decode_image` does that, where they are used)."""
    path = Path(path)
    seen: set[str] = set()
    for key, members in iter_member_groups(path):
        try:
            if key in seen:
                raise SampleProblem(f"sample {key} appears twice in shard {path} (its members are not adjacent)",
                                    DUPLICATE_KEY)
            seen.add(key)
            sample = _sample(path, key, members)
        except SampleProblem as problem:
            if not skip_bad:
                raise SampleProblem(f"{problem}; fix the shard or skip such samples", problem.kind) from None
            _count(counts, problem.kind)
            continue
        yield sample


def decode_image(sample: Sample, shard="") -> Image.Image:
    """The sample's image as 8-bit RGB (`data.datasets.to_rgb8`: alpha over white, 16-bit grey scaled); a
    SampleProblem of kind UNDECODABLE_IMAGE naming the key (and `shard`) when it does not decode."""
    try:
        with Image.open(io.BytesIO(sample.image_bytes)) as image:
            rgb = to_rgb8(image)
            rgb.load()
            return rgb
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        where = f" in shard {shard}" if shard else ""
        detail = "" if isinstance(err, UnidentifiedImageError) else (str(err) or type(err).__name__)
        raise SampleProblem(f"the image of sample {sample.key}{where} cannot be decoded: {problem_kind(err)}"
                            + (f" ({detail[:200]})" if detail else ""), UNDECODABLE_IMAGE) from None


def shard_samples(path) -> list[str]:
    """The keys of a shard's member groups in order, reading only the member names (no check of the samples):
    a cheap count and listing, e.g. to tell whether a stored part still matches its shard."""
    return [key for key, _ in iter_member_groups(path, read_data=False)]


def _resolved(path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _resolved(a) == _resolved(b)


def write_kept_keys(kept: dict[str, list[str]], out_path) -> Path:
    """Write the reduced set as JSON, atomically: {"format", "version", "total", "shards": {shard: [key, ...]}}
    (keys in the order given). Refuses an `out_path` that is one of the shards."""
    out_path = Path(out_path)
    for shard in kept:
        if _same_file(out_path, shard):
            raise UserError(f"the list of kept keys would overwrite the input shard {shard}; choose another file")
    if out_path.is_dir():
        raise UserError(f"{out_path} is a folder; give a file name for the list of kept keys")
    shards = {str(shard): [str(key) for key in keys] for shard, keys in kept.items()}
    document = {"format": "vl-distill/kept-keys", "version": 1,
                "total": sum(len(keys) for keys in shards.values()), "shards": shards}
    try:
        return atomic_write_json(document, out_path)
    except OSError as err:
        raise UserError(f"{out_path} cannot be written: {os_error_reason(err)}") from None


def read_kept_keys(path) -> dict[str, list[str]]:
    """The {shard: [key, ...]} that `write_kept_keys` wrote to `path`."""
    document = read_json_if_present(path)
    if document is None:
        raise UserError(f"list of kept keys not found: {path}")
    if not isinstance(document, dict) or document.get("format") != "vl-distill/kept-keys" \
            or not isinstance(document.get("shards"), dict):
        raise UserError(f"{path} is not a list of kept keys (written by write_kept_keys)")
    return {shard: list(keys) for shard, keys in document["shards"].items()}


class _ShardWriter:
    """Writes tar shards one after the other under temporary names; each becomes its final name in one rename
    when it is finished, so an interruption leaves only whole shards."""

    def __init__(self):
        self.path: Path | None = None
        self.tmp: Path | None = None
        self.archive: tarfile.TarFile | None = None
        self.samples = 0
        self.written: list[Path] = []

    def start(self, path: Path) -> None:
        self.finish()
        self.path, self.tmp, self.samples = path, temporary_sibling(path), 0
        self.archive = tarfile.open(self.tmp, "w")

    def add(self, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        for member, data in members:
            self.archive.addfile(copy.copy(member), io.BytesIO(data))
        self.samples += 1

    def finish(self) -> None:
        if self.archive is None:
            return
        self.archive.close()
        os.replace(self.tmp, self.path)
        self.written.append(self.path)
        self.archive = self.tmp = None

    def abandon(self) -> None:
        if self.archive is not None:
            self.archive.close()
        if self.tmp is not None and self.tmp.exists():
            self.tmp.unlink()
        self.archive = self.tmp = None


def _check_outputs(source_shards: list[str], kept: dict[str, list[str]], out_dir: Path,
                   per_input: bool) -> dict[str, str]:
    """The input shard for each shard named in `kept` (refusing unknown ones), after refusing an `out_dir` that
    holds an input shard and output names that two inputs would share."""
    by_path = {str(_resolved(shard)): str(shard) for shard in source_shards}
    for shard in kept:
        if str(_resolved(shard)) not in by_path:
            raise UserError(f"the kept keys name the shard {shard}, which is not among the {len(source_shards)} "
                            f"input shards")
    for shard in source_shards:
        if out_dir.exists() and _same_file(out_dir, Path(shard).parent):
            raise UserError(f"the output folder {out_dir} holds the input shard {shard}; write the reduced shards "
                            f"to another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"the output folder {out_dir} is a file")
    if per_input:
        names: dict[str, str] = {}
        for shard in source_shards:
            name = output_stem(shard)
            if name in names:
                raise UserError(f"the shards {names[name]} and {shard} would both be written as {name}.tar; give "
                                f"a number of samples per shard to number the outputs instead")
            names[name] = shard
    return {str(_resolved(shard)): list(keys) for shard, keys in kept.items()}


def write_shards(source_shards: Iterable[str], kept: dict[str, list[str]], out_dir, *,
                 samples_per_shard: int | None = None, progress: bool = False) -> list[Path]:
    """Write new tar shards in `out_dir` holding only the kept samples (every member of each: image, caption,
    metadata, ..., bytes as in the source) and return their paths.

    With `samples_per_shard=None` each input shard gives one output named after it (`{stem}.tar`, empty when
    nothing of it is kept, so that a brace range over the outputs names existing files); with a number the kept
    samples are packed in input order into `00000.tar`, `00001.tar`, ... of that many samples each. Each shard
    is written under a temporary name and renamed when whole. `out_dir` must not be a folder of input shards;
    every kept key must be found in its shard."""
    source_shards = [str(shard) for shard in source_shards]
    out_dir = Path(out_dir)
    if samples_per_shard is not None and (isinstance(samples_per_shard, bool) or samples_per_shard < 1):
        raise UserError(f"samples per shard must be a positive number, not {samples_per_shard!r}")
    wanted = _check_outputs(source_shards, kept, out_dir, per_input=samples_per_shard is None)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"the output folder {out_dir} cannot be created: {os_error_reason(err)}") from None
    writer = _ShardWriter()
    packed = 0
    try:
        for shard in tqdm(source_shards, desc="writing shards", unit="shard", disable=not progress):
            keys = set(wanted.get(str(_resolved(shard)), ()))
            if samples_per_shard is None:
                writer.start(out_dir / f"{output_stem(shard)}.tar")
            found: set[str] = set()
            if keys:
                for key, members in iter_member_groups(shard):
                    if key not in keys or key in found:
                        continue
                    found.add(key)
                    if samples_per_shard is not None and (writer.archive is None
                                                          or writer.samples == samples_per_shard):
                        writer.start(out_dir / f"{packed:05d}.tar")
                        packed += 1
                    writer.add(members)
            missing = sorted(keys - found)
            if missing:
                raise UserError(f"{len(missing)} kept key(s) are not in shard {shard}, e.g. {missing[0]}; the list "
                                f"of kept keys was made from other shards")
            if samples_per_shard is None:
                writer.finish()
        writer.finish()
    except OSError as err:
        raise UserError(f"the reduced shards cannot be written to {out_dir}: {os_error_reason(err)}") from None
    finally:
        writer.abandon()
    return writer.written


def unpack_shards(shards: list[str], out_dir, split: str, annotation: Path, *, kept: dict[str, list[str]] | None = None,
                  skip_bad: bool = False, progress: bool = True) -> tuple[int, dict[str, int]]:
    """Shards (or only their `kept` keys) as an image folder and an annotation file that every program reads
    (`--dataset webdata`): images/<shard>/<key>.<ext> under `out_dir`, byte for byte, and `annotation` in the
    training layout (one entry per caption) for the train split, in the evaluation layout (one entry per image with
    its caption list) for val and test. Each image is written whole or not at all and the annotation file last,
    so an interrupted unpack leaves no annotation file naming a missing image. Returns (pairs, skipped by kind)."""
    out_dir = Path(out_dir)
    names = {shard: output_stem(shard) for shard in shards}
    entries, counts = [], {}
    wanted = {shard: set(keys) for shard, keys in kept.items()} if kept is not None else None
    for shard in tqdm(shards, desc=f"unpacking ({split})", unit="shard", disable=not progress):
        for sample in iter_shard(shard, skip_bad=skip_bad, counts=counts):
            if wanted is not None and sample.key not in wanted.get(shard, ()):
                continue
            relative = Path("images") / names[shard] / f"{sample.key}.{sample.image_ext}"
            target = out_dir / relative
            if not (target.is_file() and target.stat().st_size == len(sample.image_bytes)):
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = temporary_sibling(target)
                tmp.write_bytes(sample.image_bytes)
                os.replace(tmp, target)
            name = relative.as_posix()
            entries.append({"image": name, "caption": sample.caption, "image_id": f"{names[shard]}/{sample.key}"}
                           if split == "train" else {"image": name, "caption": [sample.caption]})
    if not entries:
        raise UserError(f"no sample to unpack from {len(shards)} shards" + (" (none of the kept keys was found)"
                                                                             if kept is not None else ""))
    atomic_write_json(entries, annotation)
    return len(entries), counts
