"""Give a leg without torch (the board leg) the tiny test models that the default leg builds.

`internvl_ros.export.testing` caches each tiny model under a key that includes the versions of
numpy, onnx, tokenizers and transformers, so the board leg's interpreter looks for other folders
than the default leg's, and cannot build them (building needs torch). This has the default leg's
interpreter build (or find) each model, then links the board leg's folder name to it.

Usage, with the package's source on PYTHONPATH, run by the interpreter without torch:
    python scripts/share_tiny_models.py DEFAULT_LEG_PYTHON
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from internvl_ros.export import testing

ASK = ("import sys; from internvl_ros.export.testing import tiny_model_dirs; "
       "print(tiny_model_dirs(sys.argv[1])[0].parent)")


def share(spec: str, builder: str) -> Path:
    """Link this interpreter's cache folder of `spec` to the one `builder` builds; return it."""
    built = Path(subprocess.run([builder, "-c", ASK, spec], check=True, capture_output=True,
                                text=True, env=dict(os.environ)).stdout.strip().splitlines()[-1])
    mine = testing.cache_root() / f"{spec}-{testing._build_key(spec)}"
    if mine.is_symlink():
        if os.readlink(mine) == built.name:
            return mine
        mine.unlink()  # a link to an older build
    elif mine.exists():
        return mine  # the same key as the builder's (or a build of this interpreter's own)
    mine.symlink_to(built.name)
    return mine


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for spec in sorted(testing.SPECS):
        mine = share(spec, sys.argv[1])
        print(f"share_tiny_models: {mine} -> {os.readlink(mine) if mine.is_symlink() else 'same'}")


if __name__ == "__main__":
    main()
