"""What every command checks before any work: its inputs (resolved, of the right kind, a quantized one
read as plain weights), its output's place, its options (device, dtype, sizes, weights, name filters).

Every command is ``run(inputs, out, settings)``: its inputs as the user named them, an :class:`Output`, and
its validated settings object; the public functions (``merge``, ``extract``, ...) are keyword builders of
those two objects, and the CLI builds them from its option groups."""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..adapter.formats.base import AdapterFormat
from ..adapter.formats.gguf import FORMAT as GGUF
from ..adapter.formats.registry import Probe, claiming, is_adapter
from ..adapter.names import AUGMENTED_SUFFIX
from ..adapter.weights import LoraAdapter, adapter_of
from ..engine.devices import check_devices
from ..engine.execute import Progress
from ..errors import IncompatibleError, InvalidOptionError, UnsupportedError
from ..formats.layout import QuantLayout, dequantized, find_layout
from ..hub.source import Source, resolve_source
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.dtypes import is_floating, parse_dtype_name, safetensors_name, torch_name
from ..io.layout import parse_size
from ..io.publish import check_destination
from ..words import plural

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


@dataclass(frozen=True)
class Output:
    """A command's result: its path (None only with ``dry_run``), whether an earlier result there may be
    replaced, whether to plan only, and what is told of the progress (the CLI's bar).

    Args:
        path: the result folder (or file: a picture, a .gguf); None with ``dry_run``.
        overwrite: replace what is at ``path`` if it is an earlier lorasurgeon result (or empty).
        dry_run: plan only: headers are read, nothing is written.
        progress: told the bytes to handle and each tensor done.
        stream: a Hub input's weights read in place, by range, as the plan reads them, instead of downloaded
            (a dry run reads a Hub input's headers so, always).
    """

    path: str | os.PathLike[str] | None
    overwrite: bool = False
    dry_run: bool = False
    progress: Progress | None = None
    stream: bool = False

    @property
    def in_place(self) -> bool:
        """Whether Hub inputs' weights are read in place (by range) rather than downloaded."""
        return self.dry_run or self.stream

    def where(self) -> str | os.PathLike[str]:
        """The path to write to: refused by name when there is none (only a dry run goes without)."""
        if self.path is None:
            raise InvalidOptionError("an output folder is needed (or use dry_run)")
        return self.path


@dataclass(frozen=True)
class Input:
    """One input of a command: what the user typed, its role in messages, and the kind it must be (None: any)."""

    spec: str | os.PathLike[str]
    role: str
    want: InputKind | None = None


def prepare(
    inputs: Sequence[Input],
    out: str | os.PathLike[str] | None,
    *,
    command: str,
    overwrite: bool,
    device: str,
    in_place: bool = False,
) -> list[Source]:
    """Every command's first step, before any tensor is read: resolve each input (a path, or a Hub repo
    id), check its kind (the first one's message names swapped arguments), check the output's place
    and the device. Returns the resolved inputs, in order."""
    with open_inputs(inputs, out, command=command, overwrite=overwrite, device=device, in_place=in_place) as opened:
        return [o.source for o in opened]


@dataclass(frozen=True)
class Opened:
    """A resolved input and, where its kind was checked, its checkpoint, open (headers read once); an adapter
    read already (a llama.cpp .gguf one, which is read against the base: ``adapter``)."""

    source: Source
    checkpoint: Checkpoint | None
    adapter: LoraAdapter | None = None


class OpenedInputs(list[Opened]):
    """A command's inputs as :func:`open_inputs` opened them; ``with`` (or ``close()``) closes every one."""

    def close(self) -> None:
        for o in self:
            if o.checkpoint is not None:
                o.checkpoint.close()

    def __enter__(self) -> OpenedInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_inputs(
    inputs: Sequence[Input],
    out: str | os.PathLike[str] | None,
    *,
    command: str,
    overwrite: bool,
    device: str,
    in_place: bool = False,
) -> OpenedInputs:
    """:func:`prepare`, keeping open the checkpoint of each input whose kind it checked, for the command to
    read instead of opening it again. The caller closes them (``with``); on an error they are closed here.
    ``in_place``: Hub inputs' weights are read by range, not downloaded (hub.stream)."""
    sources = [resolve_source(i.spec, in_place=in_place) for i in inputs]
    opened = OpenedInputs()
    based: dict[int, AdapterFormat] = {}  # adapters read against the base, once every other input is open
    try:
        for n, (wanted, source) in enumerate(zip(inputs, sources, strict=True)):
            ckpt = None
            if wanted.want == "adapter" and source.path.suffix.lower() == ".gguf":
                based[n] = GGUF
                opened.append(Opened(source, None))
            elif wanted.want is not None:
                ckpt = open_checkpoint(source.path)
                opened.append(Opened(source, ckpt))
                swappable = n == 0 and not wanted.role.startswith("--")  # an option's value is not an argument
                others = [(s.path, s.label) for s in sources[1:]] if swappable else []
                check_kind(
                    input_kind(ckpt), source.label, role=wanted.role, want=wanted.want, command=command, others=others
                )
                found = claiming(Probe.of(ckpt)) if wanted.want == "adapter" else None
                if found is not None and found.read_with_base is not None:  # its names are the base's
                    ckpt.close()
                    based[n] = found
                    opened[n] = Opened(source, None)
            else:
                opened.append(Opened(source, None))
        for n, found in based.items():
            opened[n] = _based_adapter(sources[n], found, opened, command)
        if out is not None:
            check_output(out, [s.path for s in sources], overwrite=overwrite)
        check_device(device)
    except BaseException:
        opened.close()
        raise
    return opened


def _based_adapter(source: Source, found: AdapterFormat, opened: Sequence[Opened], command: str) -> Opened:
    """An adapter whose names are its base's (a llama.cpp .gguf, a kohya file), read against the model among
    the inputs, as the common adapter."""
    models = (o.checkpoint for o in opened if o.checkpoint is not None and o.adapter is None)
    base = next((c for c in models if input_kind(c) == "model"), None)
    if base is None and found.base_optional and found.read_as_named is not None:
        adapter = replace(found.read_as_named(source.path), format=found.name)
        return Opened(source, adapter.checkpoint, adapter)
    if base is None:
        what = (
            f"{source.label}: {BASED_WORDS.get(found.name, f'a {found.name} adapter')} is read against its base model"
        )
        if command in TAKES_BASE:
            raise InvalidOptionError(f"{what}: give --base BASE, the model it was made for")
        raise UnsupportedError(
            f"{what}, which lorasurgeon {command} does not take: "
            f"`lorasurgeon convert {source.label} --to peft --base BASE -o ADAPTER` makes it PEFT's"
        )
    assert found.read_with_base is not None  # the formats put here have it
    adapter = replace(found.read_with_base(source.path, base), format=found.name)
    return Opened(source, adapter.checkpoint, adapter)


BASED_WORDS = {
    "gguf": "a llama.cpp .gguf adapter",
    "kohya": "a kohya LoRA",
    "diffusers": "a diffusers LoRA",
}  # as the refusal names them


TAKES_BASE = ("resize", "combine", "check", "convert")  # the commands whose --base BASE a .gguf adapter is read against


def is_gguf(spec: str | os.PathLike[str]) -> bool:
    """Whether an input names a .gguf file (a Hub repo id is a folder): one read against a base model."""
    return Path(spec).suffix.lower() == ".gguf"


def needs_base(spec: str | os.PathLike[str]) -> bool:
    """Whether an input is an adapter read against its base model (a .gguf; a file of a format whose names are
    the base's, such as kohya's): headers only. A path that is not there needs none (its error comes later)."""
    if is_gguf(spec):
        return True
    found = claiming(Probe(Path(spec))) if Path(spec).exists() else None
    return found is not None and found.read_with_base is not None


def with_base(
    adapters: Sequence[str | os.PathLike[str]], base: str | os.PathLike[str] | None, *, needed: bool = False
) -> list[Input]:
    """A command's ADAPTERs, after ``base`` (--base) where one is given: the model :func:`open_inputs` reads a
    llama.cpp .gguf adapter among them against (or, ``needed``, one the command runs: --calibration). A --base
    that nothing needs is refused, not ignored."""
    inputs = [Input(a, "ADAPTER", "adapter") for a in adapters]
    if base is None:
        return inputs
    if not needed and not any(needs_base(a) for a in adapters):
        raise InvalidOptionError(
            f"--base {base}: only a llama.cpp .gguf adapter is read against a base model, and no ADAPTER given is "
            "one: leave --base out"
        )
    return [Input(base, "--base", "model"), *inputs]


def adapters_of(opened: Sequence[Opened]) -> list[LoraAdapter]:
    """Each input :func:`open_inputs` opened, read as an adapter from its open checkpoint (its headers not read
    again); the adapters own the checkpoints from here. On an error, those read are closed."""
    adapters: list[LoraAdapter] = []
    try:
        for o in opened:
            assert o.checkpoint is not None  # an adapter input's kind is checked, so it is open
            adapters.append(o.adapter if o.adapter is not None else adapter_of(o.checkpoint))
    except BaseException:
        for a in adapters:
            a.close()
        raise
    return adapters


@dataclass(frozen=True)
class NameFilter:
    """--include / --exclude: regexes searched in tensor names (re.search), compiled once."""

    include: re.Pattern[str] | None = None
    exclude: re.Pattern[str] | None = None

    @classmethod
    def parse(cls, include: str | None, exclude: str | None) -> NameFilter:
        def compiled(flag: str, pattern: str | None) -> re.Pattern[str] | None:
            try:
                return re.compile(pattern) if pattern else None
            except re.error as exc:
                raise InvalidOptionError(f"{flag} {pattern!r} is not a valid regex ({exc})") from None

        return cls(compiled("--include", include), compiled("--exclude", exclude))

    @property
    def active(self) -> bool:
        return self.include is not None or self.exclude is not None

    def __call__(self, name: str) -> bool:
        """Whether ``name`` is kept."""
        return not (
            (self.include is not None and not self.include.search(name))
            or (self.exclude is not None and self.exclude.search(name))
        )

    def describe(self) -> str:
        return " and ".join(
            f"{flag} {p.pattern!r}" for flag, p in (("--include", self.include), ("--exclude", self.exclude)) if p
        )


def check_output(out: str | os.PathLike[str], inputs: Sequence[Path], *, overwrite: bool) -> None:
    """Refuse, before any work, an output that overlaps an input, is a protected folder, or exists
    and is not ours to replace (see :mod:`lorasurgeon.io.publish`)."""
    check_destination(out, inputs, overwrite=overwrite)


def output_dtype(text: str | torch.dtype | None) -> str | None:
    """--dtype as a safetensors dtype name (None for "auto"), checked to be floating; no torch needed."""
    if text is None or text == "auto":
        return None
    try:
        name = parse_dtype_name(text) if isinstance(text, str) else safetensors_name(text)
    except ValueError as exc:
        raise InvalidOptionError(str(exc)) from None
    if not is_floating(name):
        raise InvalidOptionError(f"--dtype must be a floating dtype, not {torch_name(name)}")
    return name


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def adapter_weights(weights: Sequence[float] | None, adapters: int) -> tuple[float, ...]:
    """One weight per adapter (1.0 each when none is given), each checked (:func:`check_weights`)."""
    chosen = tuple(weights) if weights else (1.0,) * adapters
    if len(chosen) != adapters:
        raise InvalidOptionError(
            f"{plural(len(chosen), 'weight')} for {plural(adapters, 'adapter')}: give one --weight per adapter"
        )
    check_weights(chosen)
    return chosen


def check_weights(weights: Sequence[float]) -> None:
    """Adapter weights are finite numbers that float32 arithmetic can hold."""
    for w in weights:
        if not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w) or abs(w) > FLOAT32_MAX:
            raise InvalidOptionError(
                f"--weight {w!r}: a weight must be a finite number within float32's range (|w| <= {FLOAT32_MAX:.3g})"
            )


def parse_shard_size(text: str | int | None) -> int | None:
    try:
        return None if text is None else parse_size(text)
    except ValueError as exc:
        raise InvalidOptionError(str(exc)) from None


def check_device(device: str) -> None:
    """cpu, cuda (every GPU torch sees), cuda:N or cuda:0,1,... (engine.devices), each one torch sees."""
    check_devices(device)


def plain_weights(
    ckpt: Checkpoint, config: Mapping[str, Any], *, role: str, keep_static: bool = False
) -> tuple[Checkpoint, QuantLayout | None]:
    """A checkpoint as plain weights: a quantized one as its dequantized view (each quantized weight one
    float32 tensor, decoded when read: formats.layout), with its layout; an unquantized one as it is.

    Raises:
        UnsupportedError: quantized in a format (or a tensor layout) lorasurgeon does not read, by name.
    """
    try:
        layout = find_layout(ckpt, config)
    except UnsupportedError as exc:
        raise UnsupportedError(f"{role}: {exc}") from None
    if layout is None:
        return ckpt, None
    return dequantized(ckpt, layout, keep_static=keep_static), layout


InputKind = Literal["model", "adapter", "augmented"]
_ORDER = {
    "merge": "BASE first, then ADAPTER",
    "unmerge": "MERGED first, then ADAPTER",
    "extract": "BASE, then FINETUNED",
    "convert": "the adapter as INPUT, then --base BASE or --initial INITIAL",
}
_KIND_WORDS = {
    "model": "a model",
    "adapter": "an adapter",
    "augmented": "an augmented checkpoint (a model with LoRA layers inside)",
}


def input_kind(ckpt: Checkpoint) -> InputKind:
    """What a checkpoint is, from its keys and files: an augmented model (PEFT's LoRA layers inside), an
    adapter (a format of the registry, adapter.formats.registry, claims it), or a plain model."""
    augmented = tuple(f".{s}" for s in AUGMENTED_SUFFIX.values())
    if any(k.endswith(augmented) for k in ckpt.names()):
        return "augmented"
    return "adapter" if is_adapter(ckpt) else "model"


def check_kind(
    kind: InputKind,
    label: str,
    *,
    role: str,
    want: InputKind,
    command: str,
    others: Sequence[tuple[Path, str]] = (),
    hint: str | None = None,
) -> None:
    """Refuse an input of the wrong kind, saying what it is and what to run instead.

    ``others``: the command's other inputs (path, label), to recognise swapped arguments; ``hint``: what to
    run instead, where the caller knows better than the command's name (an option says what the user wants).
    """
    if kind == want:
        return
    what = f"{label}: {role} is {_KIND_WORDS[kind]}, not {_KIND_WORDS[want]}"
    if kind == "augmented" and want in ("adapter", "model"):
        target = "adapter" if want == "adapter" else "merged"
        raise IncompatibleError(f"{what}; `lorasurgeon convert {label} --to {target} -o OUT` gives its {target} form")
    for other, other_label in others:
        with open_checkpoint(other) as ckpt:
            if input_kind(ckpt) == want:
                raise IncompatibleError(
                    f"{what}, and {other_label} is {_KIND_WORDS[want]}: the arguments look "
                    f"swapped (lorasurgeon {command} takes {_ORDER.get(command, 'them in the other order')})"
                )
    hints = {
        ("model", "merge"): "; a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors",
        ("model", "unmerge"): "; a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors",
        (
            "adapter",
            "extract",
        ): f"; extract compares two full models (to apply an adapter: lorasurgeon merge BASE {label} -o OUT)",
        ("model", "convert"): "; convert takes what `lorasurgeon merge --form augmented` writes",
        (
            "adapter",
            "convert",
        ): f"; it is already an adapter (`lorasurgeon merge BASE {label} --form augmented` makes the augmented form)",
    }
    if command == "convert" and role != "INPUT":  # convert's other modes (--to mlx, --initial): no augmented hint
        hints = {}
    raise IncompatibleError(what + (hint if hint is not None else hints.get((kind, command), "")))
