"""Print the requirements of pyproject.toml's base install and one extra (`convstack[...]`
self-references expanded), one per line.

The images install these in a layer of their own before the wheel: the layer depends on this
output only, so a rebuild after a code change reuses it and installs just the wheel.

    python k8s/requirements.py pyproject.toml all
"""

from __future__ import annotations

import re
import sys

try:
    import tomllib
except ImportError:  # Python < 3.11: the TOML reader pip ships
    from pip._vendor import tomli as tomllib


def requirements(project: dict, extra: str) -> list[str]:
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise SystemExit(f"requirements.py: no extra {extra!r} in pyproject.toml")
    own = re.compile(rf"{re.escape(project['name'])}\[([^\]]+)\]")
    found = list(project.get("dependencies", []))
    for requirement in extras[extra]:
        match = own.fullmatch(requirement.strip())
        if match:
            for name in match.group(1).split(","):
                found += requirements(project, name.strip())
        else:
            found.append(requirement)
    return list(dict.fromkeys(found))


def main(argv: list[str]) -> int:
    with open(argv[0], "rb") as file:
        project = tomllib.load(file)["project"]
    print("\n".join(requirements(project, argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
