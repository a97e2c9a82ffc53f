"""Small data for the ``examples/own_data`` recipes, made from what bitsmith installs (no download):

* an image folder ``runs/own-images/CLASS/*.png`` of three Fashion-MNIST classes (T-shirt, trouser, bag), upscaled to
  32 x 32 RGB, as a user's own photos would be laid out;
* JSON lines ``runs/own-text.jsonl`` with a ``text`` and a ``title`` column (Python docstring bodies and summaries).

    python examples/own_data/make_data.py [--out runs] [--per-class 60] [--records 120]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CLASSES = {0: "t-shirt", 1: "trouser", 8: "bag"}


def make_images(out: Path, per_class: int) -> Path:
    from PIL import Image

    from bitsmith.zoo.data import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    folder = out / "own-images"
    for label, name in CLASSES.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        picked = images[labels == label][:per_class]
        for i, image in enumerate(picked):
            pixels = (image[0] * 255).round().byte().numpy()
            Image.fromarray(pixels, mode="L").convert("RGB").resize((32, 32)).save(folder / name / f"{i:04d}.png")
    return folder


def make_text(out: Path, records: int) -> Path:
    from bitsmith.zoo.text import docstring_pairs

    path = out / "own-text.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"title": title, "text": body}) for title, body in docstring_pairs()[:records]]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--records", type=int, default=120)
    args = parser.parse_args()
    print(make_images(args.out, args.per_class), make_text(args.out, args.records))


if __name__ == "__main__":
    main()
