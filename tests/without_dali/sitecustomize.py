"""On PYTHONPATH, makes NVIDIA DALI (and the `wds2idx` tool its wheel ships) impossible to import, as on a
machine without the DALI extra: `make test-without-dali` and tests/test_without_dali.py use it."""

import importlib.abc
import sys

BLOCKED = ("nvidia.dali", "wds2idx")


class _NoDali(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: DALI is not installed here)", name=name)
        return None


sys.meta_path.insert(0, _NoDali())
