"""Write a compact copy of CamVid (SegNet layout) for machines with a small upload limit.

Images become JPEG quality 95 (about 40 KB instead of 230 KB each; the pixels change slightly, so
scores on the copy are not bit-identical with the original), labels are copied unchanged, and the
list files are rewritten to the new image names. Used by benchmarks/gpu/gpu_results.sh.
    python benchmarks/gpu/camvid_compact.py SRC_ROOT DST_ROOT
"""
import shutil
import sys
from pathlib import Path

from PIL import Image


def main(src: Path, dst: Path) -> None:
    for split in ("train", "val", "test"):
        if not (src / split).is_dir():
            continue
        (dst / split).mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / f"{split}annot", dst / f"{split}annot", dirs_exist_ok=True)
        lines = []
        for p in sorted((src / split).glob("*.png")):
            Image.open(p).convert("RGB").save(dst / split / f"{p.stem}.jpg", quality=95)
            lines.append(f"{split}/{p.stem}.jpg {split}annot/{p.name}")
        (dst / f"{split}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
