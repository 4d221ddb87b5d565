"""Print the installed versions of everything `lightune[dev]` and its benchmarks need (run after an upgrade to refresh constraints.txt)."""

import importlib.metadata as metadata
import re

from packaging.requirements import Requirement


def closure(name: str, extras: tuple[str, ...] = (), seen: dict | None = None) -> dict:
    """{normalised name: installed version} of a distribution and everything it requires, recursively."""
    seen = {} if seen is None else seen
    key = re.sub(r"[-_.]+", "-", name).lower()
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return seen
    if key in seen:
        return seen
    seen[key] = dist.version.split("+")[0]  # torch 2.13.0+cpu -> 2.13.0 (matches the CPU wheel)
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("",) + extras):
            closure(req.name, (), seen)
    return seen


if __name__ == "__main__":
    versions = closure("lightune", ("dev", "bench", "tracking", "export", "tune"))  # every extra (dev names some)
    versions.pop("lightune")
    print("# The tested set: CI installs exactly these (pip install -c constraints.txt); see README, 'Install'.")
    print("# Regenerate after an upgrade: python3 .ci/constraints.py > constraints.txt")
    for name in sorted(versions):
        print(f"{name}=={versions[name]}")
