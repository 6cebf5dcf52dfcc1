"""Qt-free part of the ADMAnomaly Slicer module.

Everything here works on the MRML scene through ``import slicer`` alone (no ``slicer.app``, no Qt,
no ``ScriptedLoadableModule``), so it runs inside the Slicer application, in ``PythonSlicer`` and
in a plain Python with the PyPI package ``slicer-core`` (which the pytest suite uses).

* :mod:`.engine` finds the bundled engine package ``ADMAnomalyLib`` and checks dependencies;
* :mod:`.conversion` converts volume nodes to and from SimpleITK images, preserving IJK-to-RAS;
* :mod:`.naming` guesses which loaded volume is which contrast;
* :mod:`.logic` is the console / batch API (``run``, ``setThreshold``, ``processFolder``, ``train``,
  and a folder of cases: ``openFolder``, ``loadCase``, ``applyThresholdToFolder`` ...);
* :mod:`.casebrowser` keeps one case of an open folder in the scene and reads its table ``cases.csv``;
* :mod:`.jobs` runs inference and training in a background process, the engine's command line
  (GUI), polled without threads;
* :mod:`.rendering` renders a slice view with the overlay offscreen (tests, screenshots).

The engine itself is never reimplemented here: every computation goes through ``ADMAnomalyLib.api``.
"""

from .engine import DependencyError, ensure_engine_importable, missing_dependencies  # noqa: F401
from .naming import CONTRAST_LABELS, guess_contrast_roles  # noqa: F401

__all__ = [
    "CONTRAST_LABELS",
    "DependencyError",
    "ensure_engine_importable",
    "guess_contrast_roles",
    "missing_dependencies",
]
