"""Every wheel an offline GPU node needs beyond its own torch, fetched on a machine with network access.

    python3 -m engine.bench.wheelhouse DIR [--python 3.12] [--without dali,...] [--dry-run]
                                              (./launch.sh wheelhouse DIR ...)
    python3 -m engine.bench.wheelhouse DIR --install [--editable] [--dry-run]    (on the node: what setup runs)

Standard library only (with base/): it runs on a login node that may have no torch. The list is
setup.cfg's install_requires without torch, torchvision and triton (the node's CUDA builds must stay),
plus what building and testing faceclr there needs. accelerate is fetched without its dependencies and
its other requirements listed here, because its requirement on torch would otherwise pull a 3 GB torch.
`--without` leaves out what a node can do without (OPTIONAL): DALI alone is more than half the download.
On the node, `--install` (and `install_command`, which ./launch.sh gpu-check runs) installs from DIR with no
index the requirements whose wheels DIR holds, so a wheelhouse made without DALI installs everything else
(gpu-check then skips its DALI stages); `--editable` then installs faceclr itself without dependencies.
"""

from __future__ import annotations

import argparse
import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

from base.cli import OneLineParser
from base.errors import UsageError, entry_point

ROOT = Path(__file__).resolve().parents[2]
PROG = "./launch.sh wheelhouse"
NODE_PROVIDES = ("torch", "torchvision", "triton")
"""Left to the node: the CUDA builds of its PyTorch stack."""
ACCELERATE_REQUIRES = ("numpy", "packaging", "psutil", "pyyaml", "huggingface_hub", "safetensors")
"""accelerate's requirements other than torch."""
EXTRA = ("pytest", "setuptools>=68", "wheel")
"""gpu-check's test stage, and the editable install's build backend (pyproject.toml)."""
OPTIONAL = {"dali": "nvidia-dali-cuda130", "tensorboard": "tensorboard", "matplotlib": "matplotlib"}
"""What `--without` may leave out: the DALI loader (the torch loader stands in), `--log-with tensorboard`,
and the plots of pack's explore and the run report; none of gpu-check's other stages imports them."""


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def wheel_key(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427: runs of -_. become _), lower case."""
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_names(wheelhouse: Path) -> set[str]:
    """The distributions the wheelhouse holds a wheel of, as `wheel_key` spells them."""
    return {wheel_key(f.name.split("-", 1)[0]) for f in Path(wheelhouse).glob("*.whl")}


def requirements(setup_cfg: Path = ROOT / "setup.cfg", without: tuple[str, ...] = ()) -> list[str]:
    """setup.cfg's install_requires for a Linux x86_64 node (markers dropped), without NODE_PROVIDES and
    the OPTIONAL keys in `without`."""
    leave = set(NODE_PROVIDES) | {OPTIONAL[k] for k in without}
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    out = []
    for line in cfg["options"]["install_requires"].splitlines():
        req = line.split(";", 1)[0].strip()
        if req and _name(req) not in leave:
            out.append(req)
    return out


def download_commands(wheelhouse: Path, python_version: str, python: str = sys.executable,
                      without: tuple[str, ...] = ()) -> list[list[str]]:
    """`pip download` of binary wheels for `python_version` (this machine's platform): first everything
    but accelerate with dependencies, then accelerate alone."""
    reqs = requirements(without=without)
    with_deps = [r for r in reqs if _name(r) != "accelerate"] + list(ACCELERATE_REQUIRES) + list(EXTRA)
    accelerate = [r for r in reqs if _name(r) == "accelerate"]
    base = [python, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python_version,
            "--dest", str(wheelhouse)]
    commands = [base + with_deps]
    if accelerate:
        commands.append(base + ["--no-deps"] + accelerate)
    return commands


def held_requirements(wheelhouse: Path) -> tuple[list[str], list[str]]:
    """(install_requires and pytest whose wheel the wheelhouse holds, the names of those it lacks)."""
    held = wheel_names(wheelhouse)
    wanted = requirements() + ["pytest"]
    return ([r for r in wanted if wheel_key(_name(r)) in held],
            [_name(r) for r in wanted if wheel_key(_name(r)) not in held])


def install_command(wheelhouse: Path, python: str = sys.executable) -> list[str]:
    """`pip install` from the wheelhouse only (no index, no network), into `python`'s environment, of the
    requirements whose wheels it holds."""
    return [python, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
            *held_requirements(wheelhouse)[0]]


def editable_command(wheelhouse: Path, python: str = sys.executable) -> list[str]:
    """faceclr itself, editable, without its dependencies (install_command brought those the wheelhouse
    holds); the build backend comes from the wheelhouse too."""
    return [python, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse), "--no-deps",
            "-e", str(ROOT)]


def _without(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if unknown := [k for k in keys if k not in OPTIONAL]:
        raise argparse.ArgumentTypeError(f"cannot leave out {', '.join(unknown)} (choose from "
                                         f"{', '.join(OPTIONAL)})")
    return keys


def _run(commands: list[list[str]], dry_run: bool, failure: str) -> int:
    for cmd in commands:
        print("$ " + shlex.join(cmd), flush=True)
        if not dry_run and subprocess.run(cmd).returncode != 0:
            print(f"{PROG}: error: {failure}", file=sys.stderr)
            return 1
    return 0


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="folder for the wheels (358.5 MiB for Python 3.12; 102 MiB --without dali)")
    p.add_argument("--python", default="3.12", help="the GPU node's Python version (default: 3.12)")
    p.add_argument("--without", type=_without, default=(), metavar="NAME,...",
                   help=f"leave these out: {', '.join(OPTIONAL)} (the stages that need them are skipped)")
    p.add_argument("--install", action="store_true",
                   help="on the node: install from DIR what it holds, with no index (no network)")
    p.add_argument("--editable", action="store_true", help="with --install: then faceclr itself, editable")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    a = p.parse_args(argv)
    if a.install:
        if not any(a.dir.glob("*.whl")):
            raise UsageError(f"{a.dir} holds no wheels (make it with ./launch.sh wheelhouse DIR on a machine with "
                             "network access)")
        lacking = held_requirements(a.dir)[1]
        if lacking:
            print(f"not in the wheelhouse, left out: {', '.join(lacking)}", flush=True)
        commands = [install_command(a.dir)] + ([editable_command(a.dir)] if a.editable else [])
        return _run(commands, a.dry_run, f"installing from {a.dir} failed (see above: a wheel it needs is missing;"
                                         " make the wheelhouse again with ./launch.sh wheelhouse)")
    if not re.fullmatch(r"3\.\d+", a.python):
        raise UsageError(f"--python {a.python} is not a version like 3.12")
    status = _run(download_commands(a.dir, a.python, without=a.without), a.dry_run,
                  "pip download failed (see above; it needs network access to PyPI)")
    if status == 0:
        print(f"on the GPU node: FACECLR_WHEELHOUSE={a.dir} ./launch.sh gpu-check   (or setup: both install what "
              f"it holds with pip install --no-index --find-links {a.dir})")
    return status


if __name__ == "__main__":
    sys.exit(main())
