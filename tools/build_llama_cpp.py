"""Build llama.cpp's `llama-server` from a pinned PyPI source package, once per machine, into the
project's cache.

    python tools/build_llama_cpp.py  # prints the binary's path; builds it first if not cached

The tests in tests/test_llama_cpp.py run our exported control vectors in this real llama.cpp. The
source is the sdist of llama-cpp-python (which vendors llama.cpp in vendor/llama.cpp), fetched with
pip, so nothing but PyPI is needed. Only the one CMake target is built: Release, CPU only, static
(the binary needs no libllama.so beside it), without HTTPS, the web UI or tests, with 2 parallel
jobs. The result goes to $PERSONA_VECTORS_CACHE/llama.cpp/<package version>/bin/llama-server
(default ~/.cache/persona-vectors). Every step checks what an earlier, interrupted run left: the
sdist is downloaded once, the source unpacked once, and CMake continues an interrupted build where
it stopped. Needs cmake >= 3.14, a C++17 compiler and ninja or make (`pip install cmake ninja`
provides the first and last).

Beside the binary it keeps llama.cpp's own HF-to-GGUF converter from the same sdist
(convert_hf_to_gguf.py, conversion/ and gguf-py/, in <version>/convert/), which
tests/test_family_pipelines.py runs on tiny random models of each family; a cache built before it
had one gets it on the next run (the sdist is fetched again, once).
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support.hub import cache_dir  # noqa: E402

PACKAGE, VERSION = "llama-cpp-python", "0.3.36"  # its sdist vendors llama.cpp (2026-11)
TARGET = "llama-server"
BUILD_COMMAND = "python tools/build_llama_cpp.py"
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DGGML_CCACHE=OFF",
]


def root() -> Path:
    return cache_dir() / "llama.cpp" / VERSION


# what the converter needs of the tree
CONVERTER = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter_path() -> Path | None:
    """The cached convert_hf_to_gguf.py, or None when it has not been unpacked on this machine."""
    path = root() / "convert" / CONVERTER[0]
    return path if path.is_file() else None


def unpack_converter(sdist: Path, dest: Path) -> None:
    """Only the converter's files of the vendored llama.cpp tree, into `dest` (renamed into
    place)."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"unpacking the converter of {sdist.name}")
    with tarfile.open(sdist) as tar:
        wanted = [
            m for m in vendored(tar) if m.name == CONVERTER[0] or m.name.startswith(CONVERTER[1:])
        ]
        tar.extractall(tmp, members=wanted, filter="data")
    tmp.rename(dest)


def server_path() -> Path | None:
    """The cached llama-server, or None when it has not been built on this machine."""
    path = root() / "bin" / TARGET
    return path if path.is_file() and os.access(path, os.X_OK) else None


def say(msg: str) -> None:
    print(f"[build_llama_cpp] {msg}", file=sys.stderr, flush=True)


def run(cmd: list, **kw) -> None:
    say("$ " + " ".join(str(c) for c in cmd))
    code = subprocess.run(
        [str(c) for c in cmd], stdout=2, stderr=2, **kw
    ).returncode  # child output -> our stderr
    if code:
        sys.exit(
            f"[build_llama_cpp] error: {Path(str(cmd[0])).name} failed (exit {code}, see above); "
            f"fix the cause and run `{BUILD_COMMAND}` again, it continues where it stopped"
        )


def fetch_sdist(dest: Path) -> Path:
    """The sdist .tar.gz, downloaded once with pip (into a temporary folder first, so it is never
    half there)."""
    found = sorted(dest.glob("*.tar.gz"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "--no-input",
                "-d",
                tmp,
                f"{PACKAGE}=={VERSION}",
            ]
        )
        got = sorted(Path(tmp).glob("*.tar.gz"))
        if not got:
            sys.exit(
                "[build_llama_cpp] error: pip gave no .tar.gz "
                f"for {PACKAGE}=={VERSION}; check PyPI access"
            )
        os.replace(got[0], dest / got[0].name)
    return dest / got[0].name


def vendored(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The sdist's vendor/llama.cpp/ members, named relative to that folder."""
    prefix = f"{tar.getmembers()[0].name.split('/')[0]}/vendor/llama.cpp/"
    members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
    for m in members:
        m.name = m.name[len(prefix) :]
    return members


def unpack(sdist: Path, src: Path) -> None:
    """Only the vendored llama.cpp tree, into `src` (renamed into place when complete)."""
    if (src / "CMakeLists.txt").is_file():
        return
    tmp = src.with_name(src.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"unpacking {sdist.name}")
    with tarfile.open(sdist) as tar:
        members = vendored(tar)
        # ".git" is the sdist's dangling submodule pointer: without it CMake does not ask git for a
        # version
        tar.extractall(
            tmp, members=[m for m in members if m.name not in ("", ".git")], filter="data"
        )
    tmp.rename(src)


def build() -> Path:
    t0 = time.time()
    base = root()
    src, build_dir, out = base / "src", base / "build", base / "bin" / TARGET
    unpack(fetch_sdist(base / "sdist"), src)
    if not shutil.which("cmake"):
        sys.exit(
            "[build_llama_cpp] error: cmake not found: `pip "
            "install cmake ninja` (or apt-get install cmake)"
        )
    if not (os.environ.get("CXX") or any(shutil.which(c) for c in ("c++", "g++", "clang++"))):
        sys.exit("[build_llama_cpp] error: no C++ compiler: apt-get install g++ (or set CXX)")
    generator = (
        ["-G", "Ninja"] if shutil.which("ninja") and not (build_dir / "Makefile").exists() else []
    )
    if not (build_dir / "CMakeCache.txt").is_file():
        run(["cmake", "-S", src, "-B", build_dir, *generator, *CMAKE_OPTIONS])
    say(
        f"compiling {TARGET} with 2 jobs: 14 CPU-minutes, so "
        "roughly 10 minutes on 2 idle cores, more on busy ones"
    )
    run(["cmake", "--build", build_dir, "--config", "Release", "--target", TARGET, "-j", "2"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.copy2(build_dir / "bin" / TARGET, tmp)
    os.replace(tmp, out)
    if converter_path() is None:
        unpack_converter(fetch_sdist(base / "sdist"), base / "convert")
    for done in (
        src,
        build_dir,
        base / "sdist",
    ):  # only the binary and the converter are needed now
        shutil.rmtree(done, ignore_errors=True)
    say(f"built {out} in {time.time() - t0:.0f} s")
    return out


def main() -> int:
    path = server_path()
    if path is None:
        path = build()
    else:
        say(f"cached: {path}")
    if converter_path() is None:  # a binary cached before the converter was kept
        base = root()
        unpack_converter(fetch_sdist(base / "sdist"), base / "convert")
        shutil.rmtree(base / "sdist", ignore_errors=True)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
