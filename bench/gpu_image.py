"""The GPU image's package set, and which distributions of this environment it lacks (for the dry run).

`bench/gpu_image_packages.txt` lists the distributions of the device machines' image. The dry run of
`bench/gpu_check.py` (tests/test_gpu_check_dryrun.py) must not be able to import what that image lacks, so
it hides them: every distribution installed here and absent there, except those that the image's own
packages require *here*. Those exceptions exist only because the versions installed here are newer than
the image's (transformers 5.25 requires `kernels`, the image's 5.17 does not); hiding them would break the
image's packages, not ours. The project's own requirements that the image lacks are always hidden.
"""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

from packaging.requirements import Requirement

PACKAGES_FILE = Path(__file__).resolve().parent / "gpu_image_packages.txt"


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = PACKAGES_FILE) -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {canonical(line) for line in lines if line}


def _requires(dist: md.Distribution) -> list[str]:
    """Names `dist` requires without extras (markers evaluated for this interpreter)."""
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(canonical(req.name))
    return out


def hidden_distributions(image: set[str] | None = None, project: str = "prefprune") -> dict[str, str]:
    """Distributions installed here that the image lacks → why each is hidden or kept."""
    image = image_packages() if image is None else image
    installed = {canonical(d.metadata["Name"]): d for d in md.distributions()}
    own = set(_requires(installed[project])) if project in installed else set()
    needed: set[str] = set()
    todo = [name for name in installed if name in image]
    while todo:
        for req in _requires(installed[todo.pop()]):
            if req in installed and req not in needed:
                needed.add(req)
                todo.append(req)
    out = {}
    for name in sorted(set(installed) - image - {project}):
        if name in own:
            out[name] = "hidden: a requirement of prefprune that the image lacks"
        elif name in needed:
            out[name] = "kept: required here by a newer version of one of the image's packages"
        else:
            out[name] = "hidden: not on the image"
    return out


def hidden_modules(hidden: dict[str, str]) -> list[str]:
    """Top-level import names of the hidden distributions."""
    names = {d for d, why in hidden.items() if why.startswith("hidden")}
    return sorted(mod for mod, dists in md.packages_distributions().items()
                  if any(canonical(d) in names for d in dists))


if __name__ == "__main__":
    for dist, why in hidden_distributions().items():
        print(f"{dist:28s} {why}")
