"""The installed set is the locked set: scripts/install.sh cannot drift silently again.

The README's test command installs the `dev` set, so this environment must hold exactly
requirements/dev.txt + bootstrap.txt (every version equal, nothing unlocked beside them).
`KILN_LOCK_DIR` points at another lock folder (scripts/update-lock.sh checks a new set there).
"""

import os
import re
import sysconfig
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path(os.environ.get("KILN_LOCK_DIR", ROOT / "requirements"))
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", re.MULTILINE)


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(file: str) -> dict[str, str]:
    text = (LOCK / file).read_text()
    pins = {_name(name): version for name, version in PIN.findall(text)}
    assert pins, f"{LOCK / file} pins nothing"
    return pins


def _installed() -> dict[str, str]:
    # The environment's own folders, not sys.path: importing ray puts its vendored
    # packages (ray/thirdparty_files) on sys.path for the rest of the test session.
    folders = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=folders)}


def test_installed_versions_equal_the_lock():
    locked = {**_pins("dev.txt"), **_pins("bootstrap.txt")}
    installed = _installed()
    wrong = {
        name: (version, installed.get(name, "missing"))
        for name, version in locked.items()
        if installed.get(name) != version
    }
    assert not wrong, f"installed versions differ from the lock (locked, installed): {wrong}"
    unlocked = sorted(set(installed) - set(locked) - {"kiln"})
    assert not unlocked, f"installed but not in the lock: {unlocked}"


def test_every_pin_is_hashed_and_torch_is_the_cpu_build():
    hashed = re.compile(r"^([A-Za-z0-9._-]+)==\S+((?: \\\n +--hash=sha256:[0-9a-f]{64})*)", re.M)
    for path in sorted(LOCK.glob("*.txt")):
        for pin in hashed.finditer(path.read_text()):
            assert pin.group(2), f"{path.name}: {pin.group(1)} has no hash"
    assert _pins("dev.txt")["torch"].endswith("+cpu")


def test_every_extra_has_a_lock_consistent_with_the_tested_set():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    tested = _pins("dev.txt")
    for name in ["core", *project["optional-dependencies"]]:
        assert (LOCK / f"{name}.txt").is_file(), f"extra {name!r} has no lock file"
        differ = {
            package: (version, tested[package])
            for package, version in _pins(f"{name}.txt").items()
            if package in tested and tested[package] != version
        }
        assert not differ, f"{name}.txt pins other versions than dev.txt: {differ}"
    assert "onnxruntime" not in _pins("gpu.txt"), "onnxruntime-gpu replaces onnxruntime"
