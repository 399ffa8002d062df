"""Class names, palettes and label-id tables of the built-in datasets. Tier 0: stdlib only."""

from __future__ import annotations

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
# Official labelIds of the 19 trainIds, in trainId order (docs/algorithm.md §5.1). Every other labelId maps to ignore.
CITYSCAPES_TRAIN_TO_LABEL_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# The demo dataset's classes (imas_train.data.demo draws them).
DEMO_CLASSES = ("background", "road", "disc", "box", "triangle")
DEMO_PALETTE = ((0, 0, 0), (128, 64, 128), (220, 20, 60), (0, 0, 142), (250, 170, 30))


def voc_palette(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The standard PASCAL VOC colour map (bit-interleaved), first `n` entries."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return tuple(out)


VOC_PALETTE = voc_palette(len(VOC_CLASSES))


def cityscapes_label_to_train_table(ignore_index: int = 255) -> list[int]:
    """256-entry lookup table labelId -> trainId (unlisted ids -> ignore)."""
    table = [ignore_index] * 256
    for train_id, label_id in enumerate(CITYSCAPES_TRAIN_TO_LABEL_ID):
        table[label_id] = train_id
    return table


def generated_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """A palette for custom datasets without one: the VOC colour map, which stays distinct for up to 256 classes."""
    return voc_palette(n)


def builtin_classes(dataset: str) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """(class names, palette) of a built-in dataset; raises KeyError for 'folder'."""
    table = {
        "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
        "voc": (VOC_CLASSES, VOC_PALETTE),
        "demo": (DEMO_CLASSES, DEMO_PALETTE),
    }
    return table[dataset]
