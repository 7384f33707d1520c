"""Annotation formats people label in (COCO, CVAT, Label Studio, LabelMe, YOLO-seg): parsing, RLE, rasterising.

Each format module parses an export into a `LabelSet` (classes + per-image shapes, see raster.py); the thin
dataset modules in pixelseg/data/ turn that into samples for training, and `pixelseg convert` into folders.
write.py goes the other way: masks -> pre-annotations and review tasks in each tool's format (predict --format,
audit). Imports only core/.
"""
