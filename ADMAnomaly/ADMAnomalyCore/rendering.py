"""Offscreen rendering of one MRML slice view (background, foreground, segmentation overlay).

Uses the same MRML pieces as a Slicer slice viewer: ``vtkMRMLSliceLogic`` blends the volume layers
and the segmentations displayable manager draws the outline and fill, into an offscreen VTK render
window. Used by the tests (overlay pixels where the anomaly is) and for the README screenshots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer


def render_slice(background, foreground=None, segmentation=None, orientation: str = "Axial",
                 offset: float | None = None, size: int = 256, opacity: float = 0.5, scene=None,
                 application_logic=None, png_path: str | Path | None = None,
                 point: tuple[float, float, float] | None = None) -> np.ndarray:
    """Render one slice view and return it as an (H, W, 3) uint8 array (top row first).

    The slice passes through ``point`` (RAS, mm), or lies at ``offset`` mm along the view normal
    (whose sign depends on the orientation preset: the sagittal normal points left); default: the
    centre of the background volume. Optionally writes ``png_path``."""
    scene = scene or slicer.mrmlScene
    app = application_logic
    if app is None:
        app = slicer.vtkMRMLApplicationLogic()
        app.SetMRMLScene(scene)
    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLApplicationLogic(app)
    slice_logic.SetMRMLScene(scene)
    defaults = scene.GetDefaultNodeByClass("vtkMRMLSliceNode")
    if defaults is None or not defaults.GetNumberOfSliceOrientationPresets():
        # The Slicer application registers the Axial/Sagittal/Coronal presets; a bare scene has none.
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    slice_node = slice_logic.AddSliceNode(f"ADMAnomalyRender{orientation}")
    if not slice_node.SetOrientation(orientation):
        scene.RemoveNode(slice_node)
        raise ValueError(f"unknown slice orientation {orientation!r}")
    composite = slice_logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(background.GetID())
    composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    composite.SetForegroundOpacity(opacity)
    slice_node.SetDimensions(size, size, 1)
    slice_logic.FitSliceToAll()
    if offset is not None:
        slice_logic.SetSliceOffset(offset)
    else:
        if point is None:
            bounds = [0.0] * 6
            background.GetRASBounds(bounds)
            point = tuple(0.5 * (bounds[2 * axis] + bounds[2 * axis + 1]) for axis in range(3))
        slice_node.JumpSliceByOffsetting(*point)
    slice_logic.UpdatePipeline()

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(size, size)
    renderer = vtk.vtkRenderer()
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    mapper = vtk.vtkImageMapper()
    mapper.SetInputConnection(slice_logic.GetImageDataConnection())
    mapper.SetColorWindow(255.0)
    mapper.SetColorLevel(127.5)
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    renderer.AddViewProp(actor)
    group = None
    if segmentation is not None:
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(app)
        name = "vtkMRMLSegmentationsDisplayableManager2D"
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
        group = factory.InstantiateDisplayableManagers(renderer)
        group.SetMRMLDisplayableNode(slice_node)
    window.Render()
    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.Update()
    image = grabber.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
    if png_path is not None:
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(png_path))
        writer.SetInputConnection(grabber.GetOutputPort())
        writer.Write()
    # Release the render window and the temporary slice nodes before returning.
    if group is not None:
        group.SetMRMLDisplayableNode(None)
    window.Finalize()
    scene.RemoveNode(composite)
    scene.RemoveNode(slice_node)
    return np.ascontiguousarray(pixels)

