"""The image's ``pip install`` resolves for its base image's Python and platforms, and the package declares the
Pythons that Airflow 3.3 and the Amazon provider support, checked without a Docker engine.

``Dockerfile`` builds ``FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}`` and installs this package
with ``-c constraints.txt``. Here pip resolves that same command (``--dry-run``, wheels only, metadata only) in a
copy of what the Dockerfile copies, from the package index itself (this machine's pip configuration, such as local
mirrors, is ignored): for the image's Python on both platforms the image is published for, and for every other
Python the package declares on x86_64. Offline these resolutions skip; under ``CI=true`` they fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
#: The official images are Debian (bookworm: glibc 2.36) on amd64 and arm64. A wheel for an older glibc runs there;
#: pip does not widen a ``manylinux_2_X`` platform by itself, so every one is named.
GLIBC_MINORS = range(17, 37)
ARCHES = ("x86_64", "aarch64")
#: ``--python-version`` without a patch release means X.Y.0; the images ship the newest patch release, and some
#: pinned packages need a recent one (soupsieve 4.1.3: Python >= 3.11.5).
NEWEST_PATCH = 99


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def dockerfile() -> tuple[dict[str, str], str, list[tuple[list[str], str]], list[str]]:
    """The Dockerfile's ARG defaults, FROM image, COPY (sources, destination) pairs and pip install arguments."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))

    def expand(value: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)

    (image,) = re.findall(r"^FROM (\S+)", text, re.M)
    copies = []
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        words = [w for w in shlex.split(line) if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    (run,) = re.findall(r"^RUN (.*pip install .*)$", text, re.M)
    install = next(part for part in run.split("&&") if "pip install" in part)
    words = [expand(w) for w in shlex.split(install)]
    return args, expand(image), copies, words[words.index("install") + 1 :]


def project() -> dict[str, Any]:
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"])


def classifier_pythons(classifiers: list[str]) -> list[str]:
    """The ``X.Y`` of each ``Programming Language :: Python :: X.Y`` classifier, oldest first.

    :param classifiers: trove classifiers
    """
    pythons = [c.rsplit(" :: ", 1)[1] for c in classifiers if re.search(r"Python :: 3\.\d+$", c)]
    return sorted(pythons, key=lambda p: tuple(map(int, p.split("."))))


def declared_pythons() -> list[str]:
    return classifier_pythons(project()["classifiers"])


def pins() -> dict[str, str]:
    """constraints.txt as ``{canonical name: version}``."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(n): v for n, _, v in (line.partition("==") for line in lines if "==" in line)}


def pip_environment() -> dict[str, str]:
    """This environment without the machine's pip settings (mirrors, find-links, constraints), as in the image."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in {"PIP_CERT", "PIP_INDEX_URL"}
    }
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def build_context(target: Path) -> Path:
    """Copy what the Dockerfile COPYs into ``target`` (its WORKDIR) and return ``target``.

    :param target: an empty folder
    """
    for sources, destination in dockerfile()[2]:
        for source in sources:
            path = ROOT / source
            into = target / destination / (path.name if destination.endswith("/") else "")
            if path.is_dir():
                shutil.copytree(path, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, into)
    return target


def pip(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run this interpreter's pip with ``pip_environment()`` (output captured, never raises on failure)."""
    command = [sys.executable, "-m", "pip", *args]
    return subprocess.run(
        command, cwd=cwd, env=pip_environment(), capture_output=True, text=True, timeout=timeout, check=False
    )


def build_wheel(context: Path) -> Path:
    """Build the package's wheel from the build context as the image's pip does (isolated, wheels only).

    The resolutions then read the package's metadata (``Requires-Python`` included) from it instead of building
    it once per target.

    :param context: the build context (``build_context``)
    """
    result = pip("wheel", "--no-deps", "--only-binary=:all:", "--wheel-dir=dist", ".", cwd=context)
    assert result.returncode == 0, result.stderr[-4000:]
    (wheel,) = (context / "dist").glob("*.whl")
    return wheel


def resolve(context: Path, wheel: Path, python: str, arch: str) -> subprocess.CompletedProcess[str]:
    """``pip install --dry-run --report -`` of the Dockerfile's install for one Python and platform.

    :param context: the build context (``build_context``)
    :param wheel: the package built from it; stands for ``.`` in the Dockerfile's requirements
    :param python: ``X.Y``
    :param arch: ``x86_64`` or ``aarch64``
    """
    platforms = [f"--platform=manylinux_2_{minor}_{arch}" for minor in GLIBC_MINORS]
    platforms.append(f"--platform=manylinux2014_{arch}")
    nodot = python.replace(".", "")
    requirements = [
        re.sub(r"^\.(?=\[|$)", str(wheel), arg) for arg in dockerfile()[3] if arg != "--no-cache-dir"
    ]
    return pip(
        "install",
        "--dry-run",
        "--ignore-installed",
        "--only-binary=:all:",
        f"--python-version={python}.{NEWEST_PATCH}",
        "--implementation=cp",
        f"--abi=cp{nodot}",
        *platforms,
        "--quiet",
        "--report=-",
        *requirements,
        cwd=context,
    )


def index_reachable() -> bool:
    """Whether pip reaches its package index (one quick look-up, no retries)."""
    result = pip("index", "versions", "apache-airflow-core", "--retries=0", "--timeout=15", timeout=60)
    return result.returncode == 0


def targets() -> list[tuple[str, str]]:
    """(Python, arch) pairs: the image's Python on every arch, each other declared Python on x86_64."""
    image_python = dockerfile()[0]["PYTHON_VERSION"]
    others = [(python, "x86_64") for python in declared_pythons() if python != image_python]
    return [(image_python, arch) for arch in ARCHES] + others


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    """Every target resolved at once (each resolution waits mostly on the index)."""
    if not index_reachable():
        reason = "the package index is not reachable: the image's install cannot be resolved offline"
        if in_ci():
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)
    context = build_context(tmp_path_factory.mktemp("image_context"))
    wheel = build_wheel(context)
    with ThreadPoolExecutor(max_workers=len(targets())) as pool:
        futures = {target: pool.submit(resolve, context, wheel, *target) for target in targets()}
        return {target: future.result() for target, future in futures.items()}


def test_image_pins_the_python_constraints_were_resolved_on() -> None:
    args, image, _, install = dockerfile()
    assert image == f"apache/airflow:{args['AIRFLOW_VERSION']}-python{args['PYTHON_VERSION']}"
    assert (
        args["PYTHON_VERSION"] == "3.11"
    )  # the Python of .venv, where constraints.txt was resolved and tested
    assert f"apache-airflow=={args['AIRFLOW_VERSION']}" in install
    assert pins()["apache-airflow"] == args["AIRFLOW_VERSION"]


def test_declared_pythons_are_airflows_less_those_the_amazon_provider_dropped() -> None:
    """Classifiers and ``requires-python`` name each Python of Airflow 3.3 that the Amazon provider also runs on."""
    airflow = classifier_pythons(metadata("apache-airflow").get_all("Classifier") or [])
    amazon = SpecifierSet(metadata("apache-airflow-providers-amazon")["Requires-Python"])
    wanted = [python for python in airflow if f"{python}.{NEWEST_PATCH}" in amazon]
    assert wanted
    assert wanted != airflow  # today: 3.11-3.14 of Airflow's 3.10-3.14
    assert declared_pythons() == wanted
    requires = SpecifierSet(project()["requires-python"])
    assert [python for python in airflow if f"{python}.{NEWEST_PATCH}" in requires] == wanted


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize(("python", "arch"), targets(), ids=[f"py{p}-{a}" for p, a in targets()])
def test_image_install_resolves(resolutions: dict[tuple[str, str], Any], python: str, arch: str) -> None:
    """Everything the image installs comes as a wheel for that Python and platform, at the constraints' versions."""
    result = resolutions[python, arch]
    assert result.returncode == 0, result.stderr[-4000:]
    installed = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(result.stdout)["install"]
    }
    assert installed[canonicalize_name(project()["name"])] == project()["version"]
    assert installed["apache-airflow"] == dockerfile()[0]["AIRFLOW_VERSION"]
    constrained = pins()
    off_pin = {name: v for name, v in installed.items() if name in constrained and constrained[name] != v}
    assert off_pin == {}
