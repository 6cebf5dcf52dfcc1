"""An MRML scene with the logics the Slicer application would set up, for use without ``slicer.app``
(PythonSlicer scripts, the PyPI package ``slicer-core``, tests, screenshot generation)."""

from __future__ import annotations

from pathlib import Path

import slicer


class StandaloneScene:
    """A ``vtkMRMLScene`` with application, colour and volumes logics; ``load`` reads volume files
    the way Slicer's "Add data" does (``vtkSlicerVolumesLogic.AddArchetypeVolume``)."""

    def __init__(self, set_global: bool = True) -> None:
        self.scene = slicer.vtkMRMLScene()
        self.app = slicer.vtkSlicerApplicationLogic()
        self.app.SetMRMLScene(self.scene)
        self.colors = slicer.vtkSlicerColorLogic()
        self.colors.SetMRMLApplicationLogic(self.app)
        self.colors.SetMRMLScene(self.scene)
        self.app.SetModuleLogic("Colors", self.colors)
        self.volumes = slicer.vtkSlicerVolumesLogic()
        self.volumes.SetMRMLApplicationLogic(self.app)
        self.volumes.SetMRMLScene(self.scene)
        self.app.SetModuleLogic("Volumes", self.volumes)
        self._previous = getattr(slicer, "mrmlScene", None)
        if set_global:
            slicer.mrmlScene = self.scene

    def load(self, path: str | Path, name: str | None = None, labelmap: bool = False):
        """Load a volume file into the scene; ``RuntimeError`` if it cannot be read."""
        path = Path(path)
        node = self.volumes.AddArchetypeVolume(str(path), name or path.name.split(".")[0], 1 if labelmap else 0)
        if node is None:
            raise RuntimeError(f"could not load {path}")
        return node

    def count(self, class_name: str) -> int:
        return self.scene.GetNumberOfNodesByClass(class_name)

    def close(self) -> None:
        self.scene.Clear(1)
        if getattr(slicer, "mrmlScene", None) is self.scene:
            slicer.mrmlScene = self._previous
