"""twin: a calibrated digital twin of vLLM V1 serving with LoRA adapters.

The step loop's modules (`NATIVE_MODULES`) are compiled with mypyc at install time where
a C compiler is at hand (setup.py): the same source; measured here, the whole heavy
`twin run` 1.12-1.18x faster and `predictor plan` 1.14-1.25x. They run as
source instead when `TWIN_PURE_PYTHON` is set, or when any of them changed since the
build (its CRC-32 differs from `_native.json`'s): a stale binary never runs. The four go
together: compiled code reaches into the others' classes directly."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
import zlib
from pathlib import Path

NATIVE_MODULES = ("timing", "kv_cache", "scheduler", "engine")
NATIVE_RECORD = "_native.json"  # written by setup.py: module -> source_digest of the compiled source
_HERE = Path(__file__).resolve().parent


def source_digest(data: bytes) -> str:
    """A source file's fingerprint (CRC-32: it only has to tell an edited file from the
    one compiled; hashlib's import alone costs every process 14 ms)."""
    return f"{zlib.crc32(data):08x}"


class _SourceFinder:
    """Finds the `.py` of the native modules, ahead of their compiled extensions."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name not in self.names:
            return None
        source = _HERE / f"{name.rpartition('.')[2]}.py"
        loader = importlib.machinery.SourceFileLoader(name, str(source))
        return importlib.util.spec_from_file_location(name, source, loader=loader)


def native_status() -> str:
    """'compiled', or why the twin runs as pure Python: 'pure: <reason>'."""
    if os.environ.get("TWIN_PURE_PYTHON"):
        return "pure: TWIN_PURE_PYTHON is set"
    try:
        built = json.loads((_HERE / NATIVE_RECORD).read_text())
    except (OSError, ValueError):
        return "pure: not compiled at install"
    changed = [m for m in NATIVE_MODULES
               if source_digest((_HERE / f"{m}.py").read_bytes()) != built.get(m)]
    if changed:
        return f"pure: {', '.join(f'twin/{m}.py' for m in changed)} changed since the build (`make setup` or `pip install -e .` rebuilds)"
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    if not all(any((_HERE / f"{m}{s}").exists() for s in suffixes) for m in NATIVE_MODULES):
        return "pure: the compiled modules are missing (no C compiler at install?)"
    return "compiled"


NATIVE = native_status()
if NATIVE != "compiled" and not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
    # Source for all four, whatever extensions lie beside them.
    sys.meta_path.insert(0, _SourceFinder({f"{__name__}.{m}" for m in NATIVE_MODULES}))
    if NATIVE.startswith("pure: twin/"):
        print(f"twin: running the pure-Python step loop: {NATIVE[6:]}", file=sys.stderr)
