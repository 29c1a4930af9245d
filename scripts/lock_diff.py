"""Print what changed between two lock folders: `python3 scripts/lock_diff.py OLD NEW`."""

import re
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", re.MULTILINE)


def pins(folder: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(folder.glob("*.txt")):
        found.update(PIN.findall(path.read_text()))
    return found


old, new = pins(Path(sys.argv[1])), pins(Path(sys.argv[2]))
changes = [
    f"  {name}: {old.get(name, '-')} -> {new.get(name, '-')}"
    for name in sorted(old.keys() | new.keys(), key=str.lower)
    if old.get(name) != new.get(name)
]
print("update-lock: " + (f"{len(changes)} change(s)" if changes else "no version changed"))
print("\n".join(changes))
