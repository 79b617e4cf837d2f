"""What each module of a model sees, measured layer by layer: the second moment E[x xᵀ] of every linear module's
inputs over the calibration samples, with one decoder layer's weights in memory at a time.

The way llm-compressor's sequential pipeline and GPTQ run a model larger than memory: the model is built on the
meta device from its config (transformers' own class: no memory), everything outside the decoder layers (the
embedding, rotary tables, the final norm, the head) is loaded, and layer 0's inputs are caught for every sample by
a forward that stops there. Then each layer in turn is loaded (its tensors read through the engine, the next
layer's read while this one runs), run on the carried hidden states with hooks summing xᵀx of each linear module's
input (float64), and sent back to meta; its outputs are the next layer's inputs. The head's input is had by running
the model once more with each layer replaced by its recorded result (the final norm applied as the model applies
it). Each layer's moments go to a scratch spool as soon as the layer is done, so memory holds one layer, the next
one being read, and the N samples' hidden states -- never the model, never every module's moments.

Computed in float32 (whatever the checkpoint's dtype), moments summed in float64 and stored float32.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..engine.devices import devices_of
from ..engine.execute import Outcome, Progress, stream
from ..engine.plan import Ref
from ..errors import UnsupportedError
from ..io.checkpoint import Checkpoint
from ..io.spool import SpoolWriter
from ..names import ModelNames
from . import backward

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

TOKENS = "@tokens"  # the spool's key of the samples' token counts (float32, one per row of the embedding)


@dataclass(frozen=True)
class Gathered:
    """What :func:`gather` measured: each module's key in the spool for its inputs' E[x xᵀ] (modules fed the same
    tensor share one), the tokens and samples it saw, the decoder layers it ran, and the seconds it took."""

    moments: dict[str, str]
    tokens: int
    samples: int
    layers: int
    seconds: float
    vocab: int = 0  # rows of the token counts (TOKENS), the embedding's
    widest: int = 0  # the most inputs a measured module of a layer has (its E[x xᵀ] is widest × widest)
    outputs: dict[str, str] = field(default_factory=dict)  # module -> its output gradients' E[g gᵀ] (fisher)


@dataclass(frozen=True)
class _Load:
    """One group of tensors read through the engine: a layer's, or everything outside the layers."""

    name: str
    keys: dict[str, str]  # the group's state_dict name -> file key
    nbytes: int
    byte_copy: None = None

    def refs(self) -> list[Ref]:
        return [Ref(0, k) for k in dict.fromkeys(self.keys.values())]


@dataclass
class _Moments:
    """The sums xᵀx of one layer's linear inputs, one per distinct input tensor, and the rows summed."""

    prefix: str
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # the first module fed a tensor -> Σ xᵀx
    rows: dict[str, int] = field(default_factory=dict)
    same: dict[str, str] = field(default_factory=dict)  # module -> the module whose sum it shares
    # id(input) -> (module, the input): within one forward call, each input held so that its id is not reused
    _seen: dict[int, tuple[str, Any]] = field(default_factory=dict)

    def hook(self, module: str) -> Callable[..., None]:
        def record(_mod: Any, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[1] is x:
                self.same[module] = seen[0]
                return
            self._seen[id(x)] = (module, x)
            self.same[module] = module
            add_gram(self.sums, self.rows, module, x)

        return record

    def next_call(self) -> None:
        self._seen.clear()

    def spool(self, out: SpoolWriter, moments: dict[str, str]) -> None:
        """Each distinct input's E[x xᵀ] written (float32) and freed; ``moments`` told each module's key."""
        for module, total in self.sums.items():
            out.write(module, total.div_(max(1, self.rows[module])).to(torch.float32).cpu())
        for module, owner in self.same.items():
            moments[module] = owner
        self.sums.clear()


def add_gram(sums: dict[str, torch.Tensor], rows: dict[str, int], key: str, x: torch.Tensor) -> None:
    """Σ xᵀx of ``x``'s rows (its last dimension the features) added to ``sums[key]`` in float64, the rows counted."""
    flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    if key in sums:
        sums[key].addmm_(flat.T, flat)
    else:
        sums[key] = flat.T @ flat
    rows[key] = rows.get(key, 0) + flat.shape[0]


@contextmanager
def replaying(stack: Any, as_tuple: bool) -> Iterator[list[Any]]:
    """The model's layers replaced while it runs again: each passing its input on, the last giving what the
    yielded list holds (a sample's recorded result), so that what follows the layers (the final norm, the head)
    runs as the model runs it."""
    current: list[Any] = []

    def through(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if as_tuple else h

    def last(*args: Any, **kwargs: Any) -> Any:
        return (current[0],) if as_tuple else current[0]

    for layer in stack:
        layer.forward = through
    stack[-1].forward = last
    try:
        yield current
    finally:
        for layer in stack:
            del layer.forward


def linear_modules(root: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """The modules whose inputs are measured: torch's Linear and transformers' Conv1D (GPT-2), full names."""
    from transformers.pytorch_utils import Conv1D

    for name, mod in root.named_modules():
        if isinstance(mod, torch.nn.Linear | Conv1D):
            yield (f"{prefix}.{name}" if prefix else name).strip("."), mod


def decoder_layers(model: Any) -> tuple[str, Any]:
    """The model's stack of decoder layers: the ModuleList holding the most parameters, and its name."""
    best: tuple[int, str, Any] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod):
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, mod)
    if best is None:
        raise UnsupportedError(f"--calibration: {type(model).__name__} has no stack of layers to run one by one")
    return best[1], best[2]


class Stop(Exception):
    """Raised by a layer replaced to catch its inputs: the model's forward goes no further."""


def gather(
    ckpt: Checkpoint,
    names: ModelNames,
    config: Mapping[str, Any],
    samples: Sequence[Sequence[int]],
    out: SpoolWriter,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
    fisher: bool = False,
) -> Gathered:
    """Run ``ckpt`` (its ``names`` and ``config``) on ``samples`` layer by layer; each linear module's E[x xᵀ]
    spooled to ``out`` under its name (shared where modules share an input), the token counts under TOKENS; with
    ``fisher`` each one's output-gradient moment too (``backward``: the layers run back once more).

    Raises:
        UnsupportedError: transformers cannot build the model, or its weights are not held as it names them.
    """
    from ..names.from_transformers import meta_model

    start = time.perf_counter()
    try:
        model = meta_model(config).eval()
    except Exception as exc:  # transformers' own refusal, whatever its class
        raise UnsupportedError(f"--calibration: transformers cannot build this model ({exc})") from None
    dev = torch.device(devices_of(device)[0])  # the layers run in turn: on the first device given
    fisher = fisher and _has_head(model)  # without a head there is no loss to differentiate: inputs only
    stack_name, stack = decoder_layers(model)
    loads = _loads(model, stack_name, stack, ckpt, names)
    tensors = _stream_groups(loads, ckpt, dev)
    _load_outside(model, stack_name, stack, next(tensors), dev)
    ids = [torch.tensor([list(s)], dtype=torch.long, device=dev) for s in samples]
    with torch.no_grad():
        calls = _catch_inputs(model, stack[0], ids)
        moments: dict[str, str] = {}
        hidden = [c[1] for c in calls]
        calls = [(args, None, kwargs) for args, _, kwargs in calls]  # layer 0's inputs: held once, in hidden
        as_tuple = False
        if progress is not None:
            progress.start(sum(load.nbytes for load in loads[1:]) * (2 if fisher else 1))
        for i, layer in enumerate(stack):
            _materialize(model, layer, next(tensors), dev)
            if fisher:
                backward.keep_inputs(out, i, hidden)
            hidden, as_tuple = _run_layer(layer, f"{stack_name}.{i}", calls, hidden, out, moments)
            layer.to("meta")
            give_back_freed_memory()
            if progress is not None:
                progress.advance(loads[i + 1].nbytes)
        _run_head(model, stack, names, ids, hidden, as_tuple, out, moments)
    outputs: dict[str, str] = {}
    if fisher:
        _run_back(model, (stack_name, stack), loads, ckpt, dev, (ids, calls, hidden, as_tuple), out, outputs, progress)
        head = names.head.rpartition(".")[0] if names.head else None
        if head in moments:
            outputs[head] = backward.HEAD  # the head's output weight: its logits' Fisher diagonal
    if progress is not None:
        progress.finish()
    vocab = _token_counts(model, samples, out)
    tokens = sum(len(s) for s in samples)
    widest = max((_inputs(mod) for _, mod in linear_modules(stack[0], "")), default=0)
    seconds = time.perf_counter() - start
    return Gathered(moments, tokens, len(samples), len(stack), seconds, vocab, widest, outputs)


def _has_head(model: Any) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None


def _run_back(
    model: Any,
    named_stack: tuple[str, Any],
    loads: list[_Load],
    ckpt: Checkpoint,
    dev: torch.device,
    run: tuple[list[torch.Tensor], list[Any], list[Any], bool],
    out: SpoolWriter,
    outputs: dict[str, str],
    progress: Progress | None,
) -> None:
    """The backward half of ``fisher``: the head's gradient, then each layer from the last, read again (the engine
    reading the one before it meanwhile); the output-gradient moments spooled, ``outputs`` told where."""
    stack_name, stack = named_stack
    ids, calls, hidden, as_tuple = run
    model.requires_grad_(False)
    grads, head = backward.head_gradients(model, stack, ids, hidden, as_tuple)
    out.write(backward.HEAD, (head / sum(x.numel() for x in ids)).to(torch.float32).cpu())
    hidden.clear()

    def done(i: int) -> None:
        give_back_freed_memory()
        if progress is not None:
            progress.advance(loads[i + 1].nbytes)

    layers = _stream_groups(loads[1:][::-1], ckpt, dev)

    def put(layer: Any, tensors: dict[str, torch.Tensor]) -> None:
        _materialize(model, layer, tensors, dev)

    grads = backward.backward_layers(stack, stack_name, layers, put, calls, grads, out, outputs, done)
    backward.spool_moment(out, backward.EMBEDDING, grads, backward.embedding_scale(model, ids[0]))


def _inputs(module: Any) -> int:
    """A Linear's in_features, a Conv1D's (its weight is held (in, out))."""
    return int(module.weight.shape[1] if isinstance(module, torch.nn.Linear) else module.weight.shape[0])


def _loads(model: Any, stack_name: str, stack: Any, ckpt: Checkpoint, names: ModelNames) -> list[_Load]:
    """What to read: everything outside the layers first, then each layer's tensors (state_dict name -> file key)."""
    state = model.state_dict()
    tied = {t for t in names.tied if t not in names.file_of}

    def keys_of(prefix: str, inside: bool) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in state:
            under = name.startswith(f"{stack_name}.")
            if inside != under or not name.startswith(prefix) or name in tied:
                continue
            key = names.file_key(name)
            if key is None or key not in ckpt:
                raise UnsupportedError(
                    f"--calibration: {name} is not held under its own name by the checkpoint (transformers "
                    "converts this model's weights as it loads them): calibrating it is not supported yet"
                )
            out[name.removeprefix(prefix)] = key
        return out

    groups = [("outside the layers", "", False)] + [
        (f"layer {i}", f"{stack_name}.{i}.", True) for i in range(len(stack))
    ]
    loads = []
    for label, prefix, inside in groups:
        keys = keys_of(prefix, inside)
        loads.append(_Load(label, keys, sum(ckpt.info(k).nbytes for k in set(keys.values()))))
    return loads


def _stream_groups(loads: list[_Load], ckpt: Checkpoint, dev: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Each group's tensors (float32, on ``dev``), in order, read one group ahead by the engine."""

    def compute(op: _Load, read: Mapping[Ref, torch.Tensor], device: torch.device) -> Outcome[None]:
        return Outcome([(n, read[Ref(0, k)].to(device=device, dtype=torch.float32)) for n, k in op.keys.items()], None)

    pairs = stream(loads, [ckpt], compute=compute, device=str(dev), read_ahead=1)
    try:
        for load in loads:
            yield dict(next(pairs) for _ in load.keys)
    finally:
        close = getattr(pairs, "close", None)  # a generator: its reader stops
        if close is not None:
            close()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        return None


def give_back_freed_memory() -> None:
    """Return the heap a layer freed to the system (glibc's malloc_trim). Without it glibc keeps it: its adaptive
    mmap threshold puts every tensor under 32 MiB on the heap, and the freed space, interleaved with what lives
    on (the next layer's activations, read buffers), is neither returned nor fully reused -- memory grew by
    40-80 MiB a layer (benchmarks/bench_calibration.py) where the live tensors did not grow at all."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _load_outside(model: Any, stack_name: str, stack: Any, tensors: dict[str, torch.Tensor], dev: torch.device) -> None:
    """Everything but the layers made real on ``dev``: the stack set aside (it stays on meta), the rest emptied,
    its computed buffers (rotary tables) made by the model's own initializer as from_pretrained makes them, its
    weights loaded; tied ones tied again."""
    parent_name, _, leaf = stack_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, leaf, torch.nn.ModuleList())
    try:
        _materialize(model, model, tensors, dev)
    finally:
        setattr(parent, leaf, stack)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _materialize(model: Any, module: Any, tensors: dict[str, torch.Tensor], dev: torch.device) -> None:
    """``module`` made real on ``dev`` from ``tensors`` (its state_dict names): buffers computed, not stored, made
    by the model's ``_init_weights`` (as from_pretrained does); a stored one missing refused by name."""
    module.to_empty(device=dev)
    for mod in module.modules():
        if getattr(mod, "_non_persistent_buffers_set", None):
            model._init_weights(mod)
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)  # no second copy
    missing = [m for m in missing if not _tied_in(model, module, m)]
    if missing or unexpected:
        raise UnsupportedError(
            f"--calibration: the checkpoint does not hold {type(module).__name__}'s "
            f"{', '.join((missing or unexpected)[:3])} as transformers names it"
        )


def _tied_in(model: Any, module: Any, name: str) -> bool:
    """Whether ``name`` (in ``module``) is a weight the model ties to another (tie_weights sets it)."""
    if module is not model:
        return False
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return name in tied


def _catch_inputs(model: Any, first: Any, ids: list[torch.Tensor]) -> list[tuple[tuple[Any, ...], Any, dict[str, Any]]]:
    """Layer 0's call for each sample: (its other positional arguments, its hidden states, its keywords), caught
    by a forward that records them and stops the model there."""
    calls: list[tuple[tuple[Any, ...], Any, dict[str, Any]]] = []

    def catch(*args: Any, **kwargs: Any) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        calls.append((args[1:], hidden, kwargs))
        raise Stop

    first.forward = catch
    try:
        for x in ids:
            try:
                model(input_ids=x, use_cache=False)
            except Stop:
                pass
    finally:
        del first.forward
    return calls


def _run_layer(
    layer: Any,
    prefix: str,
    calls: list[tuple[tuple[Any, ...], Any, dict[str, Any]]],
    hidden: list[Any],
    out: SpoolWriter,
    moments: dict[str, str],
) -> tuple[list[Any], bool]:
    """One layer run on every sample's hidden states, its linear inputs measured and spooled; its outputs, and
    whether it returns a tuple (what the head's pass must return for it)."""
    sums = _Moments(prefix)
    hooks = [mod.register_forward_hook(sums.hook(name)) for name, mod in linear_modules(layer, prefix)]
    results, as_tuple = [], False
    try:
        for (args, _, kwargs), h in zip(calls, hidden, strict=True):
            sums.next_call()
            got = layer(h, *args, **kwargs)
            as_tuple = isinstance(got, tuple)
            results.append(got[0] if as_tuple else got)
    finally:
        for hook in hooks:
            hook.remove()
    sums.spool(out, moments)
    return results, as_tuple


def _run_head(
    model: Any,
    stack: Any,
    names: ModelNames,
    ids: list[torch.Tensor],
    hidden: list[Any],
    as_tuple: bool,
    out: SpoolWriter,
    moments: dict[str, str],
) -> None:
    """The head's input measured: the model run again with its layers replaying their recorded results."""
    head = names.head.rpartition(".")[0] if names.head else None
    if head is None or not isinstance(model.get_submodule(head), torch.nn.Linear):
        return
    sums = _Moments("")
    hook = model.get_submodule(head).register_forward_hook(sums.hook(head))
    try:
        with replaying(stack, as_tuple) as current:
            for x, h in zip(ids, hidden, strict=True):
                current[:] = [h]
                sums.next_call()
                model(input_ids=x, use_cache=False)
    finally:
        hook.remove()
    sums.spool(out, moments)


def _token_counts(model: Any, samples: Sequence[Sequence[int]], out: SpoolWriter) -> int:
    """How often each token occurs in the samples (float32, one per row of the input embedding), spooled as
    TOKENS; the embedding's rows (0 when the model has none)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = int(embedding.weight.shape[0]) if embedding is not None else 0
    if rows:
        ids = torch.tensor([t for s in samples for t in s if 0 <= t < rows], dtype=torch.long)
        out.write(TOKENS, torch.bincount(ids, minlength=rows).to(torch.float32))
    return rows
