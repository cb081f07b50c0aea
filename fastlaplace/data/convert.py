"""``python -m fastlaplace.data.convert ROOT``: turn miniImageNet's pickle files into the
decoded cache that the readers load without running code.

Loading a pickle can run arbitrary code; run this once, on files you trust, and later runs
read ``ROOT/fastlaplace-miniimagenet-84.pt`` (tensors only) without ``--allow-pickle``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import errors_as_messages
from .images import fingerprint, miniimagenet_sources, read_miniimagenet, write_cache


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m fastlaplace.data.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the folder holding mini-imagenet-cache-{train,validation,test}.pkl")
    args = p.parse_args(argv)
    with errors_as_messages():
        root = Path(args.root)
        splits = read_miniimagenet(root, allow_pickle=True)
        cache = root / "fastlaplace-miniimagenet-84.pt"
        if not write_cache(cache, splits, fingerprint(miniimagenet_sources(root))):
            raise OSError(f"could not write {cache}")
    print(f"wrote {cache}")
    return cache


if __name__ == "__main__":
    main()
