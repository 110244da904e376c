"""Let PyPI's torchvision import next to a CPU build of torch.

Why: PyPI ships torchvision compiled against CUDA torch. Next to the CPU wheel of torch its
C++ extension (`torchvision/_C.so`) cannot load (it links `libc10_cuda.so`), and torchvision
0.28's `_meta_registrations.py` then calls `torch.library.register_fake("torchvision::nms")`
without checking that the op exists, so `import torchvision` dies with
`operator torchvision::nms does not exist`. transformers, diffusers, peft and open_clip all
import torchvision, so they die too.

What this does: it installs a finder on `sys.meta_path` (no torch import at start-up). On the
first `import torchvision` it tries to load torchvision's own `_C` library. If that works
(a matched build, e.g. CUDA torch + CUDA torchvision on a GPU machine) it does nothing more.
If it fails, it declares the schemas of the two ops that torchvision registers unguarded
(`nms`, `qnms`), with no kernels. torchvision then imports; its pure-Python parts (transforms,
used by open_clip) work, and its compiled ops raise torchvision's own "Couldn't load custom
C++ ops" error when called.

Install into the active environment with:  python scripts/torchvision_cpu_hook.py --install
"""

import importlib.abc
import importlib.machinery
import os
import sys

_UNGUARDED_OPS = {  # op name -> schema, as torchvision's C++ library declares them
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARIES = []  # keep torch.library.Library objects alive: dropping one unregisters its ops


def _declare_missing_ops(package_dir: str) -> None:
    import torch

    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = os.path.join(package_dir, "_C" + suffix)
        if os.path.exists(candidate):
            try:
                torch.ops.load_library(candidate)
                return  # the real ops are there: nothing to declare
            except OSError:
                break
    missing = [name for name in _UNGUARDED_OPS if not hasattr(torch.ops.torchvision, name)]
    if not missing:
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        library.define(_UNGUARDED_OPS[name])
    _LIBRARIES.append(library)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # run once; later imports take the normal path
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.submodule_search_locations:
            try:
                _declare_missing_ops(list(spec.submodule_search_locations)[0])
            except Exception as error:  # never block an import because of this hook
                print(f"torchvision_cpu_hook: {error!r}", file=sys.stderr)
        return None  # let the normal finders import torchvision itself


def install() -> None:
    if not any(isinstance(finder, _TorchvisionFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def _install_into_environment() -> None:
    import shutil
    import sysconfig

    site_packages = sysconfig.get_paths()["purelib"]
    shutil.copy(os.path.abspath(__file__), os.path.join(site_packages, "torchvision_cpu_hook.py"))
    with open(os.path.join(site_packages, "torchvision_cpu_hook.pth"), "w") as pth:
        pth.write("import torchvision_cpu_hook; torchvision_cpu_hook.install()\n")
    print(f"torchvision_cpu_hook installed in {site_packages}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python scripts/torchvision_cpu_hook.py --install")
    _install_into_environment()
