"""Thumbnail of the bundled demo case for Slicer's SampleData module
(``ADMAnomaly/Resources/Icons/ADMAnomalyDemoCase.png``): the axial FLAIR slice with the most lesion
voxels, the reference lesions outlined in the panel's anomaly colour.

    python tools/make_sample_data_thumbnail.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
CASE = REPO / "Resources" / "DemoData" / "patient26"
OUTPUT = REPO / "ADMAnomaly" / "Resources" / "Icons" / "ADMAnomalyDemoCase.png"
SIZE = 128
OUTLINE = (26, 230, 255)  # ADMAnomalyCore.logic.SEGMENT_COLOR


def main() -> None:
    flair = sitk.GetArrayFromImage(sitk.ReadImage(str(CASE / "patient26_flair.nii.gz"))).astype(np.float32)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(CASE / "patient26_seg.nii.gz"))) > 0
    k = int(np.argmax(label.sum(axis=(1, 2))))
    # Array rows run posterior -> anterior in this LPS-stored case: flip so anterior is up, as Slicer shows it.
    image, lesion = np.flipud(flair[k]), np.flipud(label[k])
    low, high = np.percentile(image[image > 0], [1, 99.5])
    grey = (np.clip((image - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[lesion & ~ndimage.binary_erosion(lesion)] = OUTLINE
    side = max(rgb.shape[:2])
    square = np.zeros((side, side, 3), np.uint8)
    top, left = (side - rgb.shape[0]) // 2, (side - rgb.shape[1]) // 2
    square[top:top + rgb.shape[0], left:left + rgb.shape[1]] = rgb
    Image.fromarray(square).resize((SIZE, SIZE), Image.LANCZOS).save(OUTPUT, optimize=True)
    print(f"{OUTPUT} (slice {k}, {int(lesion.sum())} lesion voxels)")


if __name__ == "__main__":
    main()
