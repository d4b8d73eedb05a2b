"""Print one of pyproject.toml's requirement lists, one per line (used in image builds).

    python3 requirements.py PYPROJECT deps|load|sandbox

`sandbox` is the part of `deps` a UDF's sandbox image gets: `requests` only.
"""

import re
import sys
import tomllib


def main() -> int:
    path, which = sys.argv[1], sys.argv[2]
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    deps = project["dependencies"]
    if which == "deps":
        reqs = deps
    elif which == "load":
        reqs = project["optional-dependencies"]["load"]
    elif which == "sandbox":
        reqs = [r for r in deps if re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0] == "requests"]
    else:
        print(f"requirements.py: unknown list {which!r}", file=sys.stderr)
        return 2
    print("\n".join(sorted(set(reqs))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
