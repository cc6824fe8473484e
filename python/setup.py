"""pip route: `pip install --no-build-isolation ./python` (or `pip wheel`) with the installed setuptools, no PyPI.

build_ext runs CMake on python/CMakeLists.txt in standalone mode, which builds the C++ library from the parent
directory as a static library inside the extension. The build needs the same Debian packages as the CMake route
(cmake, a C++20 compiler, libhwy-dev, python3-dev / python3-pybind11, python3-numpy); it builds in place, so run it
from a checkout (no sdist).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def version():
    text = (HERE.parent / "include" / "omniattn" / "version.h").read_text()
    parts = [re.search(rf"#define OMNIATTN_VERSION_{p} (\d+)", text).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build_dir = Path(self.build_temp).resolve() / "cmake"
        cfg = ["-S", str(HERE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
               f"-DPython3_EXECUTABLE={sys.executable}"]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        subprocess.run(["cmake", *cfg], check=True)
        jobs = str(self.parallel or os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "_omniattn", "-j", jobs], check=True)
        built = next((build_dir / "omniattn").glob("_omniattn*.so"))
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)


setup(
    version=version(),
    packages=["omniattn"],
    ext_modules=[CMakeExtension("omniattn._omniattn")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
