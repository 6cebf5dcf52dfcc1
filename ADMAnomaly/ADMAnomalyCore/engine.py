"""Locating the bundled engine (``ADMAnomalyLib``) and checking the Python packages it needs.

The engine is imported from the extension's own files, never from PyPI:

* installed extension: ``ADMAnomalyLib/`` is packaged beside ``ADMAnomaly.py`` (``qt-scripted-modules``);
* source checkout (module path added in Application Settings): ``ADMAnomalyLib/`` is one folder up.

Nothing here imports torch: the module must load, and say clearly what is missing, without it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ENGINE_PACKAGE = "ADMAnomalyLib"
TORCH_REQUIREMENT = "torch>=2.1"
"""Installed through the PyTorch Utils extension (it picks the CUDA build matching the driver)."""


def module_dir() -> Path:
    """Folder of ``ADMAnomaly.py`` (source ``ADMAnomaly/`` or installed ``qt-scripted-modules/``)."""
    return Path(__file__).resolve().parent.parent


def engine_parent_dir() -> Path | None:
    """Folder that contains the extension's own ``ADMAnomalyLib`` package, or None if missing."""
    here = module_dir()
    for candidate in (here, here.parent):
        if (candidate / ENGINE_PACKAGE / "__init__.py").is_file():
            return candidate
    return None


def ensure_engine_importable() -> Path:
    """Put the extension's own engine first on ``sys.path`` and return the folder holding it."""
    parent = engine_parent_dir()
    if parent is None:
        raise ImportError(
            f"the engine package {ENGINE_PACKAGE} was not found beside {module_dir()} or one folder up; "
            "reinstall the ADMAnomaly extension"
        )
    entry = str(parent)
    if entry not in sys.path:
        sys.path.insert(0, entry)
    loaded = sys.modules.get(ENGINE_PACKAGE)
    if loaded is not None and getattr(loaded, "__file__", None):
        loaded_from = Path(loaded.__file__).resolve().parent.parent
        if loaded_from != parent.resolve():
            log.warning("%s is already imported from %s, not from the extension (%s)", ENGINE_PACKAGE,
                        loaded_from, parent)
    return parent


ensure_engine_importable()

from ADMAnomalyLib.errors import ADMError  # noqa: E402  (torch-free module of the engine)


class DependencyError(ADMError):
    """A Python package the engine needs is missing and could not (or may not) be installed."""

    exit_code = 2


def requirements_path() -> Path:
    """``Resources/requirements.txt`` of the module: the engine's packages other than torch."""
    return module_dir() / "Resources" / "requirements.txt"


def read_requirements(path: Path | None = None) -> list[str]:
    """Requirement lines of ``requirements.txt`` (comments and blank lines dropped)."""
    path = requirements_path() if path is None else Path(path)
    if not path.is_file():
        return []
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _requirement_parser():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - Slicer always has pip, which vendors packaging
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return None
    return Requirement


def requirement(text: str):
    """``text`` as a ``packaging`` Requirement (what ``slicer.pydeps.pip_ensure`` takes)."""
    return _requirement_parser()(text)


def is_satisfied(requirement: str) -> bool:
    """Whether ``requirement`` (e.g. ``"scikit-learn>=1.1"``) is installed in a matching version."""
    parser = _requirement_parser()
    if parser is None:
        name = requirement.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        return _installed_version(name) is not None
    parsed = parser(requirement)
    if parsed.marker is not None and not parsed.marker.evaluate():
        return True
    version = _installed_version(parsed.name)
    if version is None:
        return False
    return not parsed.specifier or parsed.specifier.contains(version, prereleases=True)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_missing() -> bool:
    """True when torch is absent or older than :data:`TORCH_REQUIREMENT`."""
    return not is_satisfied(TORCH_REQUIREMENT)


def missing_dependencies() -> list[str]:
    """Requirements (torch first, then ``requirements.txt``) that are not satisfied right now."""
    missing = [TORCH_REQUIREMENT] if torch_missing() else []
    missing += [r for r in read_requirements() if not is_satisfied(r)]
    return missing


def describe_missing(missing: list[str]) -> str:
    """One readable sentence for the module panel and the console."""
    if not missing:
        return "all required Python packages are installed"
    parts = []
    if any(r.startswith("torch") for r in missing):
        parts.append("PyTorch (installed through the PyTorch Utils extension)")
    others = [r for r in missing if not r.startswith("torch")]
    if others:
        parts.append(", ".join(others))
    return "missing Python packages: " + "; ".join(parts)
