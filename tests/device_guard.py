"""A second device on a CPU-only machine, for tests: tensors moved or created "on" it stay CPU tensors but are
tracked, report `SECOND` as their `.device`, and every op that would mix them with CPU tensors the way a CUDA
device refuses to (an elementwise op, a comparison, `isin`, `cat`, a CPU generator drawing for it, `.numpy()`)
raises here as it would on a GPU. What CUDA allows stays allowed: CPU 0-dim tensors as operands, indexing a
device tensor with CPU indices, `copy_` across devices, `.item()` / `.tolist()`.

    with SecondDevice() as dev:
        model.to(dev.device)   # parameters and buffers now "on" the second device
        ...                    # any device mix in the code under test raises DeviceMixError

Tracking: a tensor is on the second device when its storage (or, for an empty tensor, the tensor itself) was
made there; the guard keeps a reference to each such tensor, so no storage it tracks is freed and reused."""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

SECOND = torch.device("maia", 0)  # a type no code special-cases, and autocast(enabled=False) accepts
CPU = torch.device("cpu")


class DeviceMixError(RuntimeError):
    pass


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        elif isinstance(v, dict):
            yield from _flat(v.values())
        else:
            yield v


def _is_second(device) -> bool:
    if isinstance(device, str):
        device = torch.device(device)
    return isinstance(device, torch.device) and device.type == SECOND.type


def _attribute(func) -> str | None:
    owner = getattr(func, "__self__", None)
    return getattr(owner, "__name__", None) if getattr(func, "__name__", "") in ("__get__", "__set__") else None


_ALLOW_CPU_INDICES = {"__getitem__", "__setitem__", "index_put_", "index_put"}
_SYNCS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "__len__", "__repr__", "__format__",
          "dim", "size", "numel", "is_floating_point", "data_ptr", "untyped_storage", "element_size", "stride",
          "is_contiguous", "__hash__", "__iter__", "storage_offset", "nelement", "is_complex",
          "_has_compatible_shallow_copy_type", "__get__", "__set__", "get_device", "is_pinned"}


class SecondDevice(TorchFunctionMode):
    device = SECOND

    def __init__(self):
        super().__init__()
        self.kept: list[torch.Tensor] = []
        self.storages: set[int] = set()
        self.empties: set[int] = set()
        self.ops: dict[str, int] = {}  # ops that ran on the second device, by name (a test checks work happened)

    # -- tracking -------------------------------------------------------------------------------------------
    def on(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if t.numel() == 0 or t.untyped_storage().data_ptr() == 0:
            return id(t) in self.empties
        return t.untyped_storage().data_ptr() in self.storages

    def _tag(self, out):
        for t in _flat([out]):
            if isinstance(t, torch.Tensor):
                self.kept.append(t)
                if t.numel() == 0 or t.untyped_storage().data_ptr() == 0:
                    self.empties.add(id(t))
                else:
                    self.storages.add(t.untyped_storage().data_ptr())
        return out

    def _fresh_cpu(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU copy of a second-device tensor that shares nothing with it (so it is not tracked)."""
        return t.detach().clone().requires_grad_(t.requires_grad) if t.requires_grad and t.is_leaf else t.clone()

    # -- dispatch -------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        attribute = _attribute(func)
        if attribute == "device" and name == "__get__":
            return SECOND if self.on(args[0]) else func(*args, **kwargs)
        if attribute == "grad" and name == "__get__":
            grad = func(*args, **kwargs)
            return self._tag(grad) if grad is not None and self.on(args[0]) else grad
        if attribute is not None or name in _SYNCS:
            return func(*args, **kwargs)
        if name in ("to", "cpu", "cuda", "numpy", "__array__"):
            return self._move(func, name, args, kwargs)
        if name == "copy_":
            return func(*args, **kwargs)
        target = kwargs.get("device")
        if _is_second(target):  # a factory (zeros, arange, tensor, rand, ..._like with device=)
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != SECOND.type:
                raise DeviceMixError(f"{name}: a {generator.device.type} generator draws for a tensor on the second "
                                     "device (CUDA: Expected a 'cuda' device type for generator)")
            kwargs["device"] = CPU
            self._count(name)
            return self._tag(func(*args, **kwargs))
        tensors = [t for t in _flat([args, kwargs]) if isinstance(t, torch.Tensor)]
        second = [t for t in tensors if self.on(t)]
        if not second:
            return func(*args, **kwargs)
        cpu = [t for t in tensors if not self.on(t) and t.dim() > 0 and t.numel() > 0]
        if cpu and not (name in _ALLOW_CPU_INDICES and self.on(args[0])
                        and all(t.dtype in (torch.long, torch.int, torch.bool) or t is args[-1] and name ==
                                "__setitem__" and t.dim() == 0 for t in cpu)):
            shapes = ", ".join(f"{tuple(t.shape)} {t.dtype} on {'second' if self.on(t) else 'cpu'}" for t in tensors)
            raise DeviceMixError(f"{name} mixes tensors on the second device with CPU tensors: {shapes}")
        self._count(name)
        return self._tag(func(*args, **kwargs))

    def _count(self, name: str) -> None:
        self.ops[name] = self.ops.get(name, 0) + 1

    def _move(self, func, name, args, kwargs):
        t = args[0]
        if name in ("numpy", "__array__"):
            if self.on(t):
                raise DeviceMixError(f".{name}() of a tensor on the second device (CUDA: can't convert a cuda "
                                     "tensor to numpy; use .cpu() first)")
            return func(*args, **kwargs)
        if name == "cuda":
            raise DeviceMixError(".cuda() under the second-device guard")
        if name == "cpu":
            return self._fresh_cpu(t) if self.on(t) else func(*args, **kwargs)
        device = kwargs.get("device")
        rest = list(args[1:])
        for i, a in enumerate(rest):
            if isinstance(a, (torch.device, str)) and not isinstance(a, torch.dtype):
                device = a
                rest[i] = CPU
            elif isinstance(a, torch.Tensor):  # .to(other): its device and dtype
                device = SECOND if self.on(a) else a.device
                rest[i] = a.dtype
        if "device" in kwargs:
            kwargs["device"] = CPU
        if device is None:  # a dtype change only: stays where it is
            out = func(t, *rest, **kwargs)
            return self._tag(out) if self.on(t) else out
        out = func(t, *rest, **kwargs)
        if _is_second(device):
            if out is t or (out.numel() and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                            and not self.on(t)):
                out = out.clone()
            return self._tag(out)
        if self.on(t):  # to the CPU
            return self._fresh_cpu(out) if out.numel() and out.untyped_storage().data_ptr() == \
                t.untyped_storage().data_ptr() else out
        return out
