"""Test-environment shim for a CPU-only torch paired with the CUDA torchvision wheel.

The only torchvision 0.28 wheel on the package index is built for CUDA. On the +cpu torch its
compiled ops fail to load, and torchvision then dies registering fake kernels for ops that were
never defined ("operator torchvision::nms does not exist"), taking transformers and open_clip
with it. This hook defines the two missing op schemas just before torchvision registers its fake
kernels. It is installed into the test virtualenv through a .pth file so Ray worker processes get
it too, and it does nothing when torchvision's compiled ops load (any CUDA build of torch).
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "torchvision._meta_registrations"
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_libraries: list[object] = []  # keep the Library objects alive, or the definitions are dropped


def _define_missing_ops() -> None:
    import torch
    import torchvision.extension

    if torchvision.extension._has_ops():
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not torch._C._dispatch_has_kernel(f"torchvision::{name}") and not hasattr(
            torch.ops.torchvision, name
        ):
            lib.define(schema)
    _libraries.append(lib)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        _define_missing_ops()
        self._inner.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
