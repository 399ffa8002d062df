"""Turn a clone of the Clothing Co-Parsing dataset (CCP) into a folder dataset for `imas-train` (README "Custom data").

    git clone https://github.com/bearpaw/clothing-co-parsing data/ccp
    python benchmarks/accuracy/prepare.py --source data/ccp --out data/ccp_prepared

CCP (Yang et al., "Clothing Co-Parsing by Joint Image Segmentation and Labeling", CVPR 2014) has 2098 street-fashion
photos (550x832 mostly): 1004 with pixel-level annotations (`annotations/pixel-level/NNNN.mat`, a uint8
`groundtruth` map of the 59 labels in `label_list.mat`) and 1094 with image-level tags only
(`annotations/image-level/NNNN.mat`), used here as unlabeled photos. The dataset never goes into this repository.

What it writes under --out (every file atomically; an existing file of the same content is left alone):
  images/NNNN.jpg        all 2098 photos, resized so the short side is --short-side (default 128) px, JPEG q 95
  masks/NNNN.png         the 1004 annotations, grouped to the 8 classes of GROUPS, nearest-neighbour resized
  lists/annotated.txt    the 1004 annotated stems; lists/tag_only.txt the 1094 tag-only stems
  splits/val.txt         a fixed validation set: --val annotated stems (default 204) of a seeded permutation
  lists/train.txt        the other annotated stems (800 by default): the input of `imas-train make-splits`
  splits/1_8/, 1_4/      `imas-train make-splits --list lists/train.txt --out splits --fractions 1/8 1/4`, then
                         every tag-only stem appended to each unlabeled.txt (make-splits partitions one list; the
                         tag-only photos have no mask, so they can only ever be unlabeled)
  dataset.json           the settings, counts, grouping and per-class pixel shares of train and val

Reading the `.mat` files needs scipy (`pip install -e ".[bench]"`); scipy is not a dependency of the toolkit.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

# The 59 CCP labels (label_list.mat order, index = raw value) grouped into 8 coarse classes. Why these groups: at
# ~128 px a ring, a watch or a belt is a few pixels, and 59 classes over 100 labeled photos leave most classes with a
# handful of examples, so the fine labels would measure noise. The groups follow what a person looks like and what
# a new user of a clothing parser asks for: the garment on the upper body, on the lower body, or a one-piece garment
# that covers both (a dress is neither "upper" nor "lower"; splitting it would make the labels contradict the
# image), footwear, and small worn items. Legwear (tights, stockings, socks, leggings) counts as lower-body clothing.
# "jumper" in this fashion-blog data is a sweater (upper); "suit" is tagged on jackets, so it is upper too.
GROUPS: dict[str, tuple[str, ...]] = {
    "background": ("null",),
    "skin": ("skin",),
    "hair": ("hair",),
    "upper_clothes": (
        "blazer", "blouse", "cardigan", "coat", "hoodie", "jacket", "jumper", "shirt", "suit", "sweater",
        "sweatshirt", "t-shirt", "top", "vest", "bra", "cape",
    ),
    "lower_clothes": (
        "jeans", "leggings", "pants", "shorts", "skirt", "panties", "stockings", "tights", "socks",
    ),
    "dress": ("dress", "romper", "bodysuit", "swimwear", "intimate"),
    "shoes": (
        "boots", "clogs", "flats", "heels", "loafers", "pumps", "sandals", "shoes", "sneakers", "wedges",
    ),
    "accessories": (
        "accessories", "bag", "belt", "bracelet", "earrings", "glasses", "gloves", "hat", "necklace", "purse",
        "ring", "scarf", "sunglasses", "tie", "wallet", "watch",
    ),
}  # fmt: skip
CLASS_NAMES = tuple(GROUPS)
PALETTE = ((0, 0, 0), (230, 180, 150), (90, 50, 20), (220, 40, 40), (40, 80, 220), (200, 60, 200), (250, 200, 0),
           (0, 190, 160))  # fmt: skip
NUM_RAW_LABELS = 59


class PrepareError(Exception):
    """A problem with the source clone or the arguments; the message names the file and the fix."""


def label_names(source: Path) -> list[str]:
    """The 59 label names of `label_list.mat`, index = raw mask value."""
    mat = _loadmat(source / "label_list.mat")
    if "label_list" not in mat:
        raise PrepareError(f"{source / 'label_list.mat'}: no 'label_list' variable (is --source a CCP clone?)")
    return [str(cell[0]) if np.size(cell) else "" for cell in np.asarray(mat["label_list"]).ravel()]


def group_lut(names: list[str]) -> np.ndarray:
    """uint8 lookup table raw label -> coarse class index (GROUPS order); 255 for a raw value no group names."""
    where = {name: i for i, members in enumerate(GROUPS.values()) for name in members}
    missing = [n for n in names if n not in where]
    if missing:
        raise PrepareError(f"label_list.mat: labels {missing} are in no group of prepare.GROUPS; add them there")
    lut = np.full(256, 255, dtype=np.uint8)
    for raw, name in enumerate(names):
        lut[raw] = where[name]
    return lut


def _loadmat(path: Path) -> dict:
    try:
        import scipy.io
    except ImportError as exc:  # benchmark-only dependency
        raise PrepareError('reading CCP .mat files needs scipy: pip install -e ".[bench]"') from exc
    if not path.is_file():
        raise PrepareError(f"{path}: not found (is --source the root of a clothing-co-parsing clone?)")
    return scipy.io.loadmat(str(path))


def read_groundtruth(path: Path) -> np.ndarray:
    """The uint8 raw label map of one `annotations/pixel-level/NNNN.mat`."""
    mat = _loadmat(path)
    if "groundtruth" not in mat:
        raise PrepareError(f"{path}: no 'groundtruth' variable")
    gt = np.asarray(mat["groundtruth"])
    if gt.ndim != 2 or gt.max(initial=0) >= NUM_RAW_LABELS:
        raise PrepareError(f"{path}: expected a 2-D map of labels 0..58, got shape {gt.shape}, max {gt.max()}")
    return gt.astype(np.uint8)


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to `short_side`, the aspect ratio kept (rounded)."""
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _save_atomic(image: Image.Image, path: Path, **kwargs) -> None:
    from imas_core.atomic import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="JPEG" if path.suffix == ".jpg" else "PNG", **kwargs)
    data = buf.getvalue()
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data, fsync=False)  # thousands of small files; rename keeps each whole


def _write_text(path: Path, lines: list[str]) -> None:
    from imas_core.atomic import atomic_write_text

    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def prepare(
    source: Path,
    out: Path,
    *,
    short_side: int = 128,
    num_val: int = 204,
    seed: int = 0,
    fractions: tuple[str, ...] = ("1/8", "1/4"),
    log=print,
) -> dict:
    """Write the folder dataset (module docstring) and return the summary written to `out/dataset.json`."""
    photos = source / "photos"
    pixel_dir = source / "annotations" / "pixel-level"
    tag_dir = source / "annotations" / "image-level"
    for d in (photos, pixel_dir, tag_dir):
        if not d.is_dir():
            raise PrepareError(f"{d}: not a folder (is --source the root of a clothing-co-parsing clone?)")
    lut = group_lut(label_names(source))
    annotated = sorted(p.stem for p in pixel_dir.glob("*.mat"))
    tag_only = sorted(p.stem for p in tag_dir.glob("*.mat") if p.stem not in set(annotated))
    missing = [s for s in annotated + tag_only if not (photos / f"{s}.jpg").is_file()]
    if missing:
        raise PrepareError(f"{photos}: photos missing for {missing[:5]} ({len(missing)} in all)")
    if not 0 < num_val < len(annotated):
        raise PrepareError(f"--val {num_val}: needs 1..{len(annotated) - 1} of the {len(annotated)} annotated photos")
    log(f"source: {len(annotated)} annotated + {len(tag_only)} tag-only photos in {source}")

    counts = {"train": np.zeros(len(CLASS_NAMES), np.int64), "val": np.zeros(len(CLASS_NAMES), np.int64)}
    order = np.random.default_rng(seed).permutation(len(annotated))
    val = sorted(annotated[i] for i in order[:num_val])
    val_set = set(val)
    train = [s for s in annotated if s not in val_set]
    start, total = time.monotonic(), len(annotated) + len(tag_only)
    for n, stem in enumerate(annotated + tag_only, 1):
        with Image.open(photos / f"{stem}.jpg") as im:
            rgb = im.convert("RGB")
        size = resized_size(*rgb.size, short_side)
        _save_atomic(rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0), out / "images" / f"{stem}.jpg",
                     quality=95)  # fmt: skip
        if stem in val_set or stem in train:
            gt = read_groundtruth(pixel_dir / f"{stem}.mat")
            if gt.shape != (rgb.size[1], rgb.size[0]):
                raise PrepareError(f"{pixel_dir / stem}.mat: map {gt.shape} does not match photo {rgb.size[::-1]}")
            mask = lut[gt]
            if (mask == 255).any():
                raise PrepareError(f"{pixel_dir / stem}.mat: raw labels outside label_list.mat")
            small = np.asarray(Image.fromarray(mask, mode="L").resize(size, Image.Resampling.NEAREST))
            counts["val" if stem in val_set else "train"] += np.bincount(small.ravel(), minlength=len(CLASS_NAMES))
            _save_atomic(Image.fromarray(small, mode="L"), out / "masks" / f"{stem}.png")
        if n % 250 == 0 or n == total:
            log(f"  {n}/{total} photos written ({time.monotonic() - start:.0f} s)")

    _write_text(out / "lists" / "annotated.txt", annotated)
    _write_text(out / "lists" / "tag_only.txt", tag_only)
    _write_text(out / "lists" / "train.txt", train)
    _write_text(out / "splits" / "val.txt", val)
    # the labeled/unlabeled partition of the annotated training photos, as a user makes it
    cmd = [sys.executable, "-m", "imas_train", "make-splits", "--list", str(out / "lists" / "train.txt"),
           "--out", str(out / "splits"), "--seed", str(seed), "--fractions", *fractions]  # fmt: skip
    log("$ imas-train " + " ".join(cmd[3:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PrepareError(f"imas-train make-splits failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    splits = {}
    for line in proc.stdout.splitlines():
        rel = Path(line.split()[0]).relative_to(out / "splits")
        if rel.name == "unlabeled.txt":
            path = out / "splits" / rel
            annotated_unl = [x for x in path.read_text().splitlines() if x.strip()]
            _write_text(path, annotated_unl + tag_only)
            labeled = (path.parent / "labeled.txt").read_text().split()
            splits[rel.parent.name] = {"labeled": len(labeled), "unlabeled_annotated": len(annotated_unl),
                                       "unlabeled_tag_only": len(tag_only)}  # fmt: skip
    summary = {
        "source": str(source),
        "short_side": short_side,
        "seed": seed,
        "class_names": list(CLASS_NAMES),
        "palette": [list(c) for c in PALETTE],
        "groups": {k: list(v) for k, v in GROUPS.items()},
        "counts": {"annotated": len(annotated), "tag_only": len(tag_only), "val": len(val), "train": len(train)},
        "splits": splits,
        "pixel_share": {k: [round(float(x), 4) for x in v / max(1, v.sum())] for k, v in counts.items()},
    }
    from imas_core.atomic import atomic_write_json

    atomic_write_json(out / "dataset.json", summary)
    for name, info in splits.items():
        log(f"split {name}: {info['labeled']} labeled, {info['unlabeled_annotated']} + {info['unlabeled_tag_only']} "
            f"unlabeled -> {out / 'splits' / name}")  # fmt: skip
    log(f"val: {len(val)} photos -> {out / 'splits' / 'val.txt'}; classes {', '.join(CLASS_NAMES)}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="root of a clothing-co-parsing clone")
    parser.add_argument("--out", type=Path, required=True, help="output folder (outside the repository)")
    parser.add_argument("--short-side", type=int, default=128, help="short side of every image in px (default 128)")
    parser.add_argument("--val", type=int, default=204, help="annotated photos held out for validation (default 204)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val draw and of make-splits (default 0)")
    parser.add_argument("--fractions", nargs="+", default=["1/8", "1/4"], help="labeled fractions (default 1/8 1/4)")
    args = parser.parse_args(argv)
    try:
        prepare(args.source, args.out, short_side=args.short_side, num_val=args.val, seed=args.seed,
                fractions=tuple(args.fractions))  # fmt: skip
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"next: python benchmarks/accuracy/run.py --data {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
