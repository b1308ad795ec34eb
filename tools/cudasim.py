"""The emulated-GPU tier: reid-ext's CUDA implementation, run on the CPU.

``load()`` compiles the CUDA glue (csrc/cuda/*_cuda.cpp) and kernels (csrc/cuda/*.cu,
the same files nvcc builds) with the host compiler against tools/cudasim/include, a
small emulation of the CUDA runtime (every CUDA thread of a block a real OS thread,
CUDA's barrier and 32-lane warp rules), and loads them: afterwards every op and
backward op of ``torch.ops.reid_ext`` exists as ``torch.ops.reid_ext_cudasim.<op>``,
with the same schema, on CPU tensors. Within ``device()``, reid_ext's public functions
call those ops::

    import cudasim                      # tools/ on sys.path
    cudasim.load()                      # builds once into build/cudasim/<variant> (ninja, cached)
    torch.ops.reid_ext_cudasim.cosine_similarity(x, None, 1e-12)
    with cudasim.device():
        loss = reid_ext.unified_triplet_loss(x, labels)   # the CUDA kernels, emulated

Sanitizer builds (a process loads one variant): ``address`` (AddressSanitizer and
UndefinedBehaviorSanitizer) and ``thread`` (ThreadSanitizer). Their runtime must be
preloaded into the Python process, which the ``pytest`` command below does::

    python tools/cudasim.py pytest [--sanitizer address|thread] [pytest arguments]
    python tools/cudasim.py build [--sanitizer address|thread]

What it does not model (a real GPU is still needed for it): timing and occupancy, the
memory model between blocks (blocks run one after another), and tensor cores.
"""
import argparse
import contextlib
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "tools" / "cudasim"
SANITIZER_VARIABLE = "REID_EXT_CUDASIM_SANITIZER"

# Compiler flags, the runtime library to preload, and the runtime's options, per sanitizer.
SANITIZERS = {
    "address": dict(
        flags=["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
        runtime="libasan.so",
        options={"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
                 "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"},
    ),
    "thread": dict(
        flags=["-fsanitize=thread"],
        runtime="libtsan.so",
        # Only the instrumented kernels and glue are checked; torch's own threads are not.
        options={"TSAN_OPTIONS": "halt_on_error=1:ignore_noninstrumented_modules=1:report_signal_unsafe=0",
                 "OMP_NUM_THREADS": "1"},
    ),
}

# `extern __shared__ T name[];` (dynamic shared memory) becomes a pointer to the block's
# dynamic buffer: the one construct the emulation headers cannot express.
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:<>, ]*?)\s+(\w+)\s*\[\s*\]\s*;")

_loaded = None  # (sanitizer, module)


def sanitizer_from_environment() -> Optional[str]:
    value = os.environ.get(SANITIZER_VARIABLE) or None
    if value is not None and value not in SANITIZERS:
        raise ValueError(f"{SANITIZER_VARIABLE} must be one of {', '.join(SANITIZERS)} or empty, got {value!r}")
    return value


def _compiler_file(name: str) -> str:
    """The path of one of the host compiler's runtime libraries."""
    path = subprocess.run([_compiler(), f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path):
        raise RuntimeError(f"the host compiler has no {name}: install its runtime (e.g. its sanitizer package)")
    return os.path.realpath(path)


def sanitizer_runtime(sanitizer: str) -> str:
    """The path of the sanitizer's shared runtime, as the host compiler has it."""
    return _compiler_file(SANITIZERS[sanitizer]["runtime"])


def environment(sanitizer: Optional[str]) -> dict:
    """The environment a process needs to load the given variant."""
    env = dict(os.environ)
    if sanitizer is None:
        env.pop(SANITIZER_VARIABLE, None)
        return env
    env[SANITIZER_VARIABLE] = sanitizer
    # libstdc++ with it: the sanitizer intercepts __cxa_throw (the emulator ends failed threads by
    # throwing) only if libstdc++ is loaded when it starts, which Python alone does not do.
    env["LD_PRELOAD"] = " ".join([sanitizer_runtime(sanitizer), _compiler_file("libstdc++.so")])
    env.update(SANITIZERS[sanitizer]["options"])
    return env


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _write_if_changed(path: Path, text: str) -> None:
    """Keeps the file's time stamp when its text is unchanged, so that ninja does not rebuild it."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _kernel_sources(generated: Path):
    """A C++ translation unit per .cu file: the file itself, with #line so that compiler and
    sanitizer messages name the original lines."""
    generated.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + [HERE / "selftest.cu"]:
        text = _DYNAMIC_SHARED.sub(r"\1* \2 = static_cast<\1*>(::cudasim::dynamic_shared());", cu.read_text())
        target = generated / f"{cu.stem}.cpp"
        _write_if_changed(target, f'#line 1 "{cu}"\n{text}')
        sources.append(str(target))
    return sources


def _build_runtime(build_dir: Path) -> Path:
    """runtime.cpp without sanitizers (its synchronisation must stay invisible to TSan)."""
    source, header = HERE / "runtime.cpp", HERE / "include" / "cudasim" / "runtime.h"
    digest = hashlib.sha256(source.read_bytes() + header.read_bytes()).hexdigest()
    obj, stamp = build_dir / "runtime.o", build_dir / "runtime.o.sha256"
    if obj.exists() and stamp.exists() and stamp.read_text() == digest:
        return obj
    build_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([_compiler(), "-std=c++17", "-O2", "-g", "-fPIC", "-pthread", f"-I{HERE / 'include'}", "-c",
                    str(source), "-o", str(obj)], check=True)
    stamp.write_text(digest)
    return obj


def _preloaded(sanitizer: str) -> bool:
    name = SANITIZERS[sanitizer]["runtime"].split(".")[0]
    with open("/proc/self/maps") as maps:
        return any(name in line for line in maps)


def load(sanitizer: Optional[str] = None, verbose: bool = False):
    """Builds (once; ninja keeps it up to date) and loads the emulated-GPU build, registers the
    fake kernels and autograd of its ops, and returns its module (the emulator's controls:
    set_multiprocessor_count, launch_counts, reset_launch_counts, selftest).

    sanitizer: None, "address" or "thread"; default: $REID_EXT_CUDASIM_SANITIZER.
    """
    global _loaded
    sanitizer = sanitizer or sanitizer_from_environment()
    if _loaded is not None:
        if _loaded[0] != sanitizer:
            raise RuntimeError(f"the {_loaded[0] or 'plain'} emulated build is loaded already; a process loads one")
        return _loaded[1]
    if sanitizer is not None and not _preloaded(sanitizer):
        raise RuntimeError(
            f"the {sanitizer} build needs {SANITIZERS[sanitizer]['runtime']} preloaded: run "
            f"`python tools/cudasim.py pytest --sanitizer {sanitizer} ...`, or set the variables of "
            f"cudasim.environment({sanitizer!r}) before starting Python")

    import torch
    from torch.utils import cpp_extension

    import reid_ext

    variant = sanitizer or "plain"
    build_dir = ROOT / "build" / "cudasim" / variant
    build_dir.mkdir(parents=True, exist_ok=True)
    runtime = _build_runtime(build_dir)
    # The CUDA glue, and the op composed of the others (dispatched to this build's kernels).
    glue = sorted(str(p) for p in (ROOT / "csrc" / "cuda").glob("*_cuda.cpp")) + [
        str(ROOT / "csrc" / "hetero_center_triplet_loss.cpp")]
    flags = ["-O1" if sanitizer else "-O2", "-g", "-DREID_EXT_CUDASIM"] + (SANITIZERS[sanitizer]["flags"] if sanitizer else [])
    module = cpp_extension.load(
        name=f"reid_ext_cudasim_{variant}",
        sources=_kernel_sources(build_dir / "generated") + glue + [str(HERE / "module.cpp")],
        extra_include_paths=[str(HERE / "include"), str(HERE), str(ROOT / "csrc")],
        extra_cflags=flags,
        extra_ldflags=[str(runtime), "-pthread"] + (SANITIZERS[sanitizer]["flags"] if sanitizer else []),
        build_directory=str(build_dir),
        verbose=verbose,
    )
    assert hasattr(torch.ops.reid_ext_cudasim, "unified_triplet_loss")
    reid_ext.ops._register("reid_ext_cudasim")
    _loaded = (sanitizer, module)
    return module


@contextlib.contextmanager
def device():
    """Within it, reid_ext's public functions run the emulated CUDA kernels on CPU tensors."""
    load()
    import reid_ext

    with reid_ext.ops._calling("reid_ext_cudasim"):
        yield


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "pytest"])
    parser.add_argument("--sanitizer", choices=sorted(SANITIZERS), default=None)
    args, rest = parser.parse_known_args(argv)
    env = environment(args.sanitizer)
    if args.command == "build":
        code = f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import cudasim; cudasim.load(verbose=True)"
        return subprocess.run([sys.executable, "-c", code], env=env).returncode
    # A sanitizer reports on file descriptor 2 and ends the process: pytest must not capture it there,
    # or the report goes down with the process.
    capture = ["--capture=sys"] if args.sanitizer else []
    return subprocess.run([sys.executable, "-m", "pytest", *capture, *rest], env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
