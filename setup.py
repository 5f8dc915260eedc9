"""Build: the twin's step loop (`twin.NATIVE_MODULES`) compiled to C with mypyc where it
can be, else left as pure Python: the same source either way, and the same results
(tests/test_twin_native.py). Everything else is in pyproject.toml.

The compiled modules are optional extensions: without a C compiler the install goes on
with the pure-Python twin. `TWIN_PURE_PYTHON=1` at install time skips the compilation.
`twin/_native.json` records each compiled source's CRC-32, so that a source edited
after the build runs as source, never as a stale binary (`twin/__init__.py`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from twin import NATIVE_MODULES, NATIVE_RECORD, source_digest  # noqa: E402 (the list has one owner: twin/__init__.py)

sys.path.pop(0)


# The commands that build code; pip's other calls (egg_info, dist_info: metadata only)
# skip the half minute of mypyc.
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}


def ext_modules() -> list:
    if not BUILDS & set(sys.argv[1:]):
        return []
    if os.environ.get("TWIN_PURE_PYTHON"):
        return []  # (an editable tree's earlier build, if any, stays as it was)
    record = ROOT / "twin" / NATIVE_RECORD
    record.unlink(missing_ok=True)
    sources = [f"twin/{m}.py" for m in NATIVE_MODULES]
    try:
        from mypyc.build import mypycify

        # One shared library inside the package (twin/_step_loop__mypyc.*.so), not at the top level.
        exts = mypycify(["--ignore-missing-imports", "--follow-imports=silent", *sources], opt_level="3",
                        group_name="twin._step_loop")
    except (Exception, SystemExit) as e:  # no mypy (a build without isolation), or it refused
        print(f"twin: building the pure-Python twin (mypyc: {e!r})", file=sys.stderr)
        return []
    for ext in exts:
        ext.optional = True  # no C compiler: the pure-Python twin
    digests = {m: source_digest((ROOT / "twin" / f"{m}.py").read_bytes()) for m in NATIVE_MODULES}
    record.write_text(json.dumps(digests, indent=1) + "\n")
    return exts


setup(ext_modules=ext_modules())
