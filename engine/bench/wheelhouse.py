"""Every wheel an offline GPU node needs beyond its own torch, fetched on a machine with network access.

    python3 engine/bench/wheelhouse.py DIR [--python 3.12] [--dry-run]     (./launch.sh wheelhouse DIR ...)

Standard library only: it runs as a script on a login node that may have no torch. The list is
setup.cfg's install_requires without torch, torchvision and triton (the node's CUDA builds must stay),
plus what building and testing faceclr there needs. accelerate is fetched without its dependencies and
its other requirements listed here, because its requirement on torch would otherwise pull a 3 GB torch.
On the node, `install_command` installs from DIR with no index (./launch.sh gpu-check and setup do it
when FACECLR_WHEELHOUSE=DIR is set).
"""

from __future__ import annotations

import argparse
import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NODE_PROVIDES = ("torch", "torchvision", "triton")
"""Left to the node: the CUDA builds of its PyTorch stack."""
ACCELERATE_REQUIRES = ("numpy", "packaging", "psutil", "pyyaml", "huggingface_hub", "safetensors")
"""accelerate's requirements other than torch."""
EXTRA = ("pytest", "setuptools>=68", "wheel")
"""gpu-check's test stage, and the editable install's build backend (pyproject.toml)."""


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(setup_cfg: Path = ROOT / "setup.cfg") -> list[str]:
    """setup.cfg's install_requires for a Linux x86_64 node (markers dropped), without NODE_PROVIDES."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    out = []
    for line in cfg["options"]["install_requires"].splitlines():
        req = line.split(";", 1)[0].strip()
        if req and _name(req) not in NODE_PROVIDES:
            out.append(req)
    return out


def download_commands(wheelhouse: Path, python_version: str, python: str = sys.executable) -> list[list[str]]:
    """`pip download` of binary wheels for `python_version` (this machine's platform): first everything
    but accelerate with dependencies, then accelerate alone."""
    reqs = requirements()
    with_deps = [r for r in reqs if _name(r) != "accelerate"] + list(ACCELERATE_REQUIRES) + list(EXTRA)
    accelerate = [r for r in reqs if _name(r) == "accelerate"]
    base = [python, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python_version,
            "--dest", str(wheelhouse)]
    commands = [base + with_deps]
    if accelerate:
        commands.append(base + ["--no-deps"] + accelerate)
    return commands


def install_command(wheelhouse: Path, python: str = sys.executable) -> list[str]:
    """`pip install` from the wheelhouse only (no index, no network), into `python`'s environment."""
    return [python, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
            *requirements(), "pytest"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./launch.sh wheelhouse", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="folder for the wheels (about 300 MB)")
    p.add_argument("--python", default="3.12", help="the GPU node's Python version (default: 3.12)")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    a = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", a.python):
        print(f"./launch.sh wheelhouse: error: --python {a.python} is not a version like 3.12", file=sys.stderr)
        return 2
    commands = download_commands(a.dir, a.python)
    for cmd in commands:
        print("$ " + shlex.join(cmd), flush=True)
        if not a.dry_run and subprocess.run(cmd).returncode != 0:
            print("./launch.sh wheelhouse: error: pip download failed (see above; it needs network access to "
                  "PyPI)", file=sys.stderr)
            return 1
    print(f"on the GPU node: FACECLR_WHEELHOUSE={a.dir} ./launch.sh gpu-check   (installs with: "
          f"{shlex.join(install_command(a.dir, 'python3')[1:])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
