"""What each module's error costs the model, measured layer by layer: the second moment of the loss gradient at
every linear module's output -- the output-side weight of issue 27's whitened extraction (its Fisher, K-FAC).

To second order, an error E = ΔW − BA in a module costs the model E[(gᵀ·E·x)²] in loss, x the module's input and g
the loss gradient at its output. K-FAC (Martens & Grosse, 2015) takes g and x as independent: the cost is
tr(Eᵀ·Gr·E·Gc) = ‖Lrᵀ·E·Lc‖² with Gr = E[g gᵀ], Gc = E[x xᵀ] -- the weighted problem ``ops.whitened`` solves, its
rows weighed by Gr. The loss is the log-likelihood of a token drawn from the model's own next-token distribution at
every position (seeded), so that Gr is the Fisher's factor: the expected Hessian of the KL to the model there.
Input whitening alone weighs every output direction alike; the directions the layers after a module respond to are
the ones this finds.

Run the way the forward is: during it each layer's inputs are kept (in the scratch spool, on disk); the gradient at
the last layer's output is had from the final norm and the head; then from the last layer back each layer is read
again, re-run on its kept inputs with autograd, and the carried gradient sent back through it, hooks summing gᵀg at
each linear module's output (float64). Memory: one layer, the samples' hidden states and their gradients; disk:
the hidden states once per layer (float32, in the scratch spool, gone with it). A model without a head (nothing to
differentiate) is measured on its inputs only (``layerwise.gather``). The gradient reaching layer 0's input is
the embedding's output weight (times c², where its output is c times its rows: Gemma's √hidden); the head's own is
the diagonal of the Fisher of its logits, E[p(1 − p)] per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..io.spool import SpoolWriter

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

SEED = 0  # the draw of the tokens whose log-likelihood is differentiated
EMBEDDING = "@fisher.embedding"  # the spool's key of E[g gᵀ] at layer 0's input (the embedding's output)
HEAD = "@fisher.head"  # the spool's key of the head's Fisher diagonal, E[p(1 − p)] (one per vocabulary row)


def output_key(module: str) -> str:
    return f"{module}@out"


def inputs_key(layer: int) -> str:
    return f"@inputs.{layer}"


Call = tuple[tuple[Any, ...], Any, dict[str, Any]]  # a layer's call: other positional arguments, -, keywords


def keep_inputs(out: SpoolWriter, layer: int, hidden: Sequence[torch.Tensor]) -> None:
    """Layer ``layer``'s inputs for every sample, as one (tokens, hidden) tensor in the spool until read back."""
    out.write(inputs_key(layer), torch.cat([h.detach().reshape(-1, h.shape[-1]) for h in hidden]).cpu())


def kept_inputs(out: SpoolWriter, layer: int, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """What :func:`keep_inputs` kept, split and shaped as ``like`` (the samples' hidden states), and let go of."""
    flat = out.read(inputs_key(layer)).to(like[0].device)
    out.discard(inputs_key(layer))
    sizes = [h.numel() // h.shape[-1] for h in like]
    return [x.reshape(h.shape) for x, h in zip(flat.split(sizes), like, strict=True)]


@dataclass
class _Outputs:
    """Σ gᵀg of the gradients at each linear module's output, and the rows summed."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def hook(self, module: str) -> Callable[..., None]:
        def on_output(_mod: Any, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g: self.add(module, g))

        return on_output

    def add(self, module: str, g: torch.Tensor) -> None:
        from .layerwise import add_gram

        add_gram(self.sums, self.rows, module, g)

    def spool(self, out: SpoolWriter, keys: dict[str, str]) -> None:
        for module, total in self.sums.items():
            keys[module] = output_key(module)
            out.write(keys[module], total.div_(max(1, self.rows[module])).to(torch.float32).cpu())
        self.sums.clear()


def head_gradients(
    model: Any, stack: Any, ids: Sequence[torch.Tensor], hidden: Sequence[torch.Tensor], as_tuple: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The loss gradient at the last layer's output, per sample, and the Fisher diagonal of the logits summed over
    positions: the model run with its layers replaying their recorded results (``layerwise.replaying``)."""
    from .layerwise import replaying

    gen = torch.Generator(device=hidden[0].device).manual_seed(SEED)
    grads, fisher = [], None
    with replaying(stack, as_tuple) as current:
        for x, h in zip(ids, hidden, strict=True):
            h = h.detach().requires_grad_(True)
            current[:] = [h]
            with torch.enable_grad():
                logits = model(input_ids=x, use_cache=False).logits.float()
                logits = logits.reshape(-1, logits.shape[-1])
                p = logits.detach().softmax(-1)
                drawn = torch.multinomial(p, 1, generator=gen)[:, 0]
                torch.nn.functional.cross_entropy(logits, drawn, reduction="sum").backward()
            part = (p * (1 - p)).sum(0, dtype=torch.float64)
            fisher = part if fisher is None else fisher + part
            assert h.grad is not None
            grads.append(h.grad)
    assert fisher is not None
    return grads, fisher


def backward_layers(
    stack: Any,
    stack_name: str,
    layers: Iterator[dict[str, torch.Tensor]],
    materialize: Callable[[Any, dict[str, torch.Tensor]], None],
    calls: Sequence[Call],
    grads: list[torch.Tensor],
    out: SpoolWriter,
    keys: dict[str, str],
    done: Callable[[int], None],
) -> list[torch.Tensor]:
    """Each layer from the last back: made real from ``layers`` (its tensors, last layer first), re-run on its kept
    inputs with autograd, ``grads`` sent back through it; each linear module's E[g gᵀ] spooled (``keys`` told
    where). Returns the gradients at layer 0's input."""
    from .layerwise import linear_modules

    for i in reversed(range(len(stack))):
        layer = stack[i]
        materialize(layer, next(layers))
        layer.requires_grad_(False)
        sums = _Outputs()
        hooks = [m.register_forward_hook(sums.hook(n)) for n, m in linear_modules(layer, f"{stack_name}.{i}")]
        inputs = kept_inputs(out, i, grads)
        try:
            for k, ((args, _, kwargs), x) in enumerate(zip(calls, inputs, strict=True)):
                x.requires_grad_(True)
                with torch.enable_grad():
                    got = layer(x, *args, **kwargs)
                    torch.autograd.backward(got[0] if isinstance(got, tuple) else got, grads[k])
                assert x.grad is not None
                grads[k] = x.grad
        finally:
            for hook in hooks:
                hook.remove()
        sums.spool(out, keys)
        layer.to("meta")
        done(i)
    return grads


def embedding_scale(model: Any, ids: torch.Tensor) -> float:
    """c where the input embedding's output is c times its rows (Gemma's √hidden; 1 for most): a change of its
    weight moves the output c times as far, so its cost is c² times the gradients' moment at its output. 1 where the
    output is not a multiple of the rows."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None or getattr(embedding, "weight", None) is None:
        return 1.0
    with torch.no_grad():
        got = embedding(ids).float()
        rows = torch.nn.functional.embedding(ids, embedding.weight).float()
    norm = float(rows.square().sum())
    c = float((got * rows).sum()) / norm if norm else 1.0
    return c if norm and torch.allclose(got, c * rows, rtol=1e-5, atol=1e-7) else 1.0


def spool_moment(out: SpoolWriter, key: str, grads: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """E[g gᵀ] over every position of ``grads`` (float64 sums, stored float32), times ``scale``²."""
    from .layerwise import add_gram

    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for g in grads:
        add_gram(sums, rows, key, g)
    out.write(key, (sums[key] * scale**2 / max(1, rows[key])).to(torch.float32).cpu())
