"""Small hand-made TAO-layout datasets for tests that need exact control over files."""

from pathlib import Path

import numpy as np
from PIL import Image

LIGHTS = ("LowAngleLight", "SolderLight")
# TAO's published example specs, verbatim (TAO's documented fields and values, placeholder paths).
TAO_SPECS = Path(__file__).resolve().parent / "tao_specs"


def write_pair_dataset(
    root: Path,
    rows: list[tuple[str, str, str, str]],
    lights: tuple[str, ...] = LIGHTS,
    size: tuple[int, int] = (8, 6),
    image_ext: str = ".png",
    csv_name: str = "pairs.csv",
) -> Path:
    """Write images for ``rows`` of (input_path, golden_path, object_name, label) and a CSV.

    Each image is filled with a value derived from its path, so tests can tell images apart.
    Returns the CSV path; images live under ``root / "images"``.
    """
    images = root / "images"
    for input_path, golden_path, object_name, _ in rows:
        for folder in (input_path, golden_path):
            for light in lights or ("",):
                suffix = f"_{light}" if light else ""
                path = images / folder / f"{object_name}{suffix}{image_ext}"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    value = sum(map(ord, str(path.relative_to(images)))) % 256
                    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
                    Image.fromarray(pixels).save(path)
    csv_path = root / csv_name
    lines = ["input_path,golden_path,object_name,label", *(",".join(row) for row in rows)]
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path
