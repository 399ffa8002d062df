"""Values every package agrees on (docs/algorithm.md §5, §8)."""

from __future__ import annotations

IGNORE_INDEX = 255  # ignore label everywhere (docs/algorithm.md §5.1)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # normalisation of 0-1 RGB
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_RGB = (123, 116, 103)  # ImageNet mean x 255 as uint8: pad colour of weak augmentation and of window padding
DEFAULT_WINDOW = 769  # the reference's sliding-window size (docs/algorithm.md §8); its default stride is 512
