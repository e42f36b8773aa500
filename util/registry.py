"""Find classes by name: ``--model X`` -> ``models/X_model.py::XModel``, ``--dataset_mode X`` ->
``data/X_dataset.py::XDataset``.

A name may also be a dotted module path (``my_lab.my_model``) so a model kept outside this
repository plugs in without editing it; the class is the one whose lower-case name, without
underscores, is the module's last part without underscores (``my_model`` -> ``MyModel``).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil


class RegistryError(KeyError):
    """An unknown model or dataset name; the message lists the available names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def available(package: str, suffix: str) -> list[str]:
    """Names ``X`` of the modules ``<package>/X_<suffix>.py`` (the abstract ``base`` excluded)."""
    pkg = importlib.import_module(package)
    tail = f"_{suffix}"
    names = (m.name[: -len(tail)] for m in pkgutil.iter_modules(pkg.__path__) if m.name.endswith(tail))
    return sorted(n for n in names if n != "base")


def find_class(package: str, name: str, suffix: str, base: type) -> type:
    """The subclass of ``base`` that ``name`` refers to; :class:`RegistryError` if there is none."""
    if "." in name:
        module_name = name
        stem = name.rsplit(".", 1)[1]
    else:
        names = available(package, suffix)
        if name not in names:
            listed = ", ".join(names) if names else "none yet"
            raise RegistryError(f"unknown {suffix} {name!r}; available: {listed}")
        module_name = f"{package}.{name}_{suffix}"
        stem = f"{name}_{suffix}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RegistryError(f"cannot import {suffix} module {module_name!r} ({exc})") from exc
    target = stem.replace("_", "").lower()
    for cls_name, cls in inspect.getmembers(module, inspect.isclass):
        if cls_name.lower() == target and issubclass(cls, base) and cls is not base:
            return cls
    raise RegistryError(f"{module_name} defines no subclass of {base.__name__} named like {stem!r}")
