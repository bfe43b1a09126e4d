"""Small synthetic image folders for smoke tests and examples: an easy, learnable classification task.

Class ``k`` of ``n`` is a bright horizontal band at its own height on a dark, noisy background (unchanged by the
horizontal flips of the default augmentation), so a tiny model separates the classes within a few epochs.
``python -m camex_vision.train.synthetic DIR`` writes ``DIR/train`` and ``DIR/validation`` in timm's folder layout.
"""
import argparse
import os
from typing import Dict, Sequence

import numpy as np
from PIL import Image


def _image(rng: np.random.RandomState, label: int, num_classes: int, size: int, channels: int) -> np.ndarray:
    img = rng.normal(40., 20., (size, size, channels))
    band = max(1, size // (num_classes + 1))
    top = int(round(label * (size - band) / max(num_classes - 1, 1)))
    img[top:top + band] += 170.
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image_folder(
        root: str,
        num_classes: int = 3,
        per_class: Dict[str, int] = None,
        size: int = 16,
        channels: int = 3,
        seed: int = 0,
        ext: str = '.png',
        class_names: Sequence[str] = None,
) -> str:
    """Writes ``root/<split>/<class>/<i><ext>`` for each split of ``per_class`` (default 40 train, 16 validation).

    Returns ``root``.
    """
    per_class = per_class or {'train': 40, 'validation': 16}
    names = list(class_names or [f'class_{chr(ord("a") + i)}' for i in range(num_classes)])
    rng = np.random.RandomState(seed)
    for split, count in per_class.items():
        for label, name in enumerate(names):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = _image(rng, label, len(names), size, channels)
                Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(os.path.join(folder, f'{i}{ext}'))
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Write a small synthetic image-folder dataset')
    parser.add_argument('root')
    parser.add_argument('--num-classes', type=int, default=3)
    parser.add_argument('--train', type=int, default=40, help='training images per class')
    parser.add_argument('--validation', type=int, default=16, help='validation images per class')
    parser.add_argument('--size', type=int, default=16)
    parser.add_argument('--channels', type=int, default=3, choices=(1, 3))
    args = parser.parse_args(argv)
    write_image_folder(args.root, args.num_classes, {'train': args.train, 'validation': args.validation},
                       args.size, args.channels)
    print(args.root)


if __name__ == '__main__':
    main()
