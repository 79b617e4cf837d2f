"""Where compute runs: ``--device`` as a list of torch devices, one compute worker (at least) on each.

``cpu``; ``cuda`` (every GPU torch sees: CUDA_VISIBLE_DEVICES chooses them); ``cuda:N``; ``cuda:0,1,3``
(those GPUs; a bare number takes the type before it). The engine gives compute worker *i* device
``i mod n``: a tensor's result does not depend on which GPU computed it (the same kernels, in float32), so
the bytes written are those of one device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidOptionError

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


def devices_of(spec: str) -> list[str]:
    """The devices ``spec`` names, in order (``cuda``: each GPU torch sees, at least cuda:0).

    Raises:
        InvalidOptionError: a device that is not cpu or cuda[:N], one named twice, or CPU with GPUs.
    """
    if spec == "cpu":  # known without asking torch (and without importing it)
        return ["cpu"]
    out: list[str] = []
    kind = ""
    for part in spec.split(","):
        part = part.strip()
        if part.isdigit() and kind:
            part = f"{kind}:{part}"
        try:
            dev = torch.device(part)
        except RuntimeError:
            raise InvalidOptionError(f"unknown device {part!r}: use cpu, cuda, cuda:N or cuda:0,1,...") from None
        if dev.type not in ("cpu", "cuda"):
            raise InvalidOptionError(f"unsupported device {part!r}: use cpu, cuda, cuda:N or cuda:0,1,...")
        kind = dev.type
        if part == "cuda" and "," not in spec:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            return [f"cuda:{i}" for i in range(max(1, count))]
        out.append(str(dev))
    if len(set(out)) != len(out) or len({d.split(":")[0] for d in out}) > 1:
        raise InvalidOptionError(f"--device {spec}: name each GPU once, and no CPU beside them")
    return out


def check_devices(spec: str) -> list[str]:
    """:func:`devices_of`, each GPU one torch sees (InvalidOptionError naming the one it does not)."""
    found = devices_of(spec)
    if found == ["cpu"]:
        return found
    if not torch.cuda.is_available():
        raise InvalidOptionError(f"device {spec!r} asked for, but torch sees no CUDA GPU")
    count = torch.cuda.device_count()
    for dev in found:
        index = torch.device(dev).index or 0
        if index >= count:
            raise InvalidOptionError(f"device {dev!r} asked for, but torch sees {count} GPU{'s' * (count != 1)}")
    return found


def check_cluster(cluster: str | None, device: str) -> None:
    """--cluster: ray or none, and the workers' CPUs (InvalidOptionError naming what is wrong)."""
    if cluster not in (None, "ray"):
        raise InvalidOptionError(f"unknown --cluster {cluster!r}: choose ray")
    if cluster is not None and device != "cpu":
        raise InvalidOptionError("--cluster ray computes on the workers' CPUs: leave --device out (GPU tasks: not yet)")
