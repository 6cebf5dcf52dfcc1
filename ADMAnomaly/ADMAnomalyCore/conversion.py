"""Volume node <-> SimpleITK image conversion with numpy only (no ``sitkUtils``, which needs slicer.app).

MRML stores the voxel-to-world mapping as IJK-to-RAS; SimpleITK (ITK) uses LPS. With
``F = diag(-1, -1, 1)``: ``origin_LPS = F origin_RAS`` and ``direction_LPS = F direction_RAS``
(columns are the i, j, k axis directions); spacing is shared. Voxel arrays are (k, j, i) in both.
Output nodes copy the input node's geometry with ``CopyOrientation`` so their IJK-to-RAS matrix
is bit-identical to the input's, not merely close.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk

import slicer

_FLIP = np.diag([-1.0, -1.0, 1.0])


def ijk_to_ras_array(node) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a volume node as a numpy array."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def direction_ras(node) -> np.ndarray:
    """3x3 matrix whose columns are the RAS directions of the i, j, k axes."""
    directions = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(directions)
    return np.array([[directions.GetElement(r, c) for c in range(3)] for r in range(3)])


def geometry_from_node(node) -> dict:
    """Size (i, j, k), spacing, LPS origin and row-major LPS direction of a volume node."""
    image = node.GetImageData()
    size = tuple(int(d) for d in image.GetDimensions()) if image is not None else (0, 0, 0)
    origin = _FLIP @ np.asarray(node.GetOrigin(), dtype=float)
    direction = _FLIP @ direction_ras(node)
    return {
        "size": size,
        "spacing": tuple(float(s) for s in node.GetSpacing()),
        "origin": tuple(float(o) for o in origin),
        "direction": tuple(float(d) for d in direction.ravel()),
    }


def header_image(node) -> sitk.Image:
    """A uint8 image with the node's grid (voxels zero): for grid checks without copying voxels."""
    geometry = geometry_from_node(node)
    image = sitk.Image([max(1, s) for s in geometry["size"]], sitk.sitkUInt8)
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    return image


def sitk_from_volume_node(node, dtype=None) -> sitk.Image:
    """SimpleITK image (a copy) of a scalar or labelmap volume node, in LPS physical space.

    A parent transform is not applied (the caller checks that inputs share one)."""
    array = slicer.util.arrayFromVolume(node)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry = geometry_from_node(node)
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    return image


def ijk_to_ras_from_sitk(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix equivalent to a SimpleITK image's geometry."""
    direction = _FLIP @ np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)[None, :]
    matrix[:3, 3] = _FLIP @ np.asarray(image.GetOrigin(), dtype=float)
    return matrix


def update_volume_node_from_sitk(node, image: sitk.Image, reference_node=None) -> None:
    """Fill ``node`` with the voxels of ``image``.

    With ``reference_node`` (a volume on the same grid) the geometry is copied from that node
    exactly; otherwise it is computed from the image's spacing, origin and direction."""
    array = sitk.GetArrayViewFromImage(image)  # no copy: updateVolumeFromArray copies the voxels
    if reference_node is not None:
        expected = tuple(reversed(reference_node.GetImageData().GetDimensions()))
        if array.shape != expected:
            raise ValueError(f"image of shape {array.shape} does not fit reference volume {expected}")
        node.CopyOrientation(reference_node)
    else:
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras_from_sitk(image)))
    slicer.util.updateVolumeFromArray(node, array)


def oriented_labelmap(array: np.ndarray, reference_node) -> "slicer.vtkOrientedImageData":
    """A ``vtkOrientedImageData`` (uint8, geometry of ``reference_node``) holding ``array`` (k, j, i)."""
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array, dtype=np.uint8)
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    labelmap.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras_array(reference_node)))
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    labelmap.GetPointData().SetScalars(scalars)
    return labelmap
