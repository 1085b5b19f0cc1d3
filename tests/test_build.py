"""setup.py's choices that depend on the build machine's toolchain."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def setup_output(env):
    """What `python setup.py --version` prints; setup.py describes the extension (and links) at import."""
    run = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "TFM_KERNELS_CUDA": "0", **env})
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def loaded_libstdcxx():
    code = "import torch; print(sorted({l.split()[-1] for l in open('/proc/self/maps') if '/libstdc++.so' in l})[0])"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def stand_in_compiler(tmp_path, answer):
    """A C++ compiler whose -print-file-name=libstdc++.so prints `answer`."""
    compiler = tmp_path / "c++"
    compiler.write_text(f'#!/bin/sh\n[ "$1" = "-print-file-name=libstdc++.so" ] && echo {answer}\n')
    compiler.chmod(0o755)
    return str(compiler)


def test_links_torchs_libstdcxx_where_the_compiler_has_only_the_static_one(tmp_path):
    """A compiler that finds no libstdc++.so (it prints the bare name back, as the GPU machines' /opt/gcc g++
    does) would link libstdc++.a into the extension: a second copy of it in the process, which crashed the first
    error message that formats a number. setup.py links the libstdc++.so.6 that torch loads instead."""
    output = setup_output({"CXX": stand_in_compiler(tmp_path, "libstdc++.so")})
    assert f"linking ['{loaded_libstdcxx()}']" in output, output


def test_links_as_usual_where_the_compiler_finds_the_shared_libstdcxx(tmp_path):
    found = tmp_path / "libstdc++.so"
    found.touch()
    assert "finds no shared libstdc++" not in setup_output({"CXX": stand_in_compiler(tmp_path, found)})
