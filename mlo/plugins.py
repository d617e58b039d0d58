"""A user's own code, imported by name before a config is read (``run.plugins``).

An entry is a module name (``my_package.levels``, importable from ``sys.path``) or a ``.py`` file (relative
to the current directory, or absolute). A file is imported once per process under a name made from its
absolute path, so a config read twice (a run and its ``eval``, the runs of a comparison) imports it once;
its path is kept absolute, so a saved config finds it from any directory.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from mlo.errors import ConfigError


def _is_file(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def load_plugins(entries: list[str]) -> list[str]:
    """Import every entry (once); the entries with files made absolute. Failures are one-line ConfigErrors."""
    loaded = []
    for entry in entries:
        if _is_file(entry):
            path = Path(entry).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"run.plugins: '{entry}' is not a file (give a .py file, or a module name "
                                  f"importable from sys.path)")
            name = f"needsgen_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                _execute(entry, lambda: spec.loader.exec_module(module), name)
            loaded.append(str(path))
        else:
            if entry not in sys.modules:
                _execute(entry, lambda: importlib.import_module(entry), entry)
            loaded.append(entry)
    return loaded


def _execute(entry: str, run, name: str) -> None:
    try:
        run()
    except ConfigError:  # a registration refused (a duplicate name): its own one-line message
        sys.modules.pop(name, None)
        raise
    except Exception as exc:  # noqa: BLE001  (any error of the user's module, reported in one line)
        sys.modules.pop(name, None)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"run.plugins: importing '{entry}' failed: {type(exc).__name__}: {first}") from None
