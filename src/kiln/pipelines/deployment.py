"""`kiln.load()` and `Deployment`: one artifact, verified, planned and ready to run."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.artifacts import Manifest, read_manifest, verify_files
from kiln.errors import ArtifactError, InvalidRequestError
from kiln.models.spec import ComponentSpec
from kiln.profiles.hardware import HardwareProfile, detect
from kiln.profiles.select import Plan, Policy, select
from kiln.runtimes import open_session
from kiln.runtimes.base import Session


class Deployment:
    """A loaded artifact: its manifest, the plan chosen for this machine, open sessions."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        plan: Plan,
        sessions: dict[str, Session],
        load_seconds: float,
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.plan = plan
        self.sessions = sessions
        self.load_seconds = load_seconds

    @property
    def family(self) -> str:
        return self.manifest.family

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidRequestError(
            f"{self.root} holds a {self.family} model; generate() is for Stable Diffusion"
        )

    def caption(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidRequestError(
            f"{self.root} holds a {self.family} model; caption() is for BLIP models"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, family={self.family!r})\n{self.plan}"


def load(
    path: str | os.PathLike[str],
    *,
    prefer: Sequence[str] | str = (),
    require: Sequence[str] | str = (),
    profile: HardwareProfile | None = None,
    verify: bool = True,
) -> Deployment:
    """Load an artifact folder: verify its files, pick variants for this machine, open them.

    `prefer`/`require` take `runtime:precision` strings (`onnx:fp32`, `unet=openvino:int8`).
    """
    started = time.perf_counter()
    root = Path(path)
    manifest = read_manifest(root)
    if not manifest.variants:
        raise ArtifactError(f"{root} has no exported variants yet; run `kiln export` into it")
    policy = Policy.from_strings(
        [prefer] if isinstance(prefer, str) else list(prefer),
        [require] if isinstance(require, str) else list(require),
    )
    plan = select(manifest, profile or detect(), policy)
    if verify:
        verify_files(root, manifest.support_files)
        for choice in plan.choices:
            verify_files(root, manifest.variant(choice.variant_id).files)
    sessions = {}
    for choice in plan.choices:
        spec = ComponentSpec.from_dict(manifest.components[choice.component])
        sessions[choice.component] = open_session(
            root, manifest.variant(choice.variant_id), spec, choice.runtime
        )
    seconds = time.perf_counter() - started
    if manifest.family == "stable-diffusion":
        from kiln.pipelines.diffusion import DiffusionDeployment

        return DiffusionDeployment(root, manifest, plan, sessions, seconds)
    return Deployment(root, manifest, plan, sessions, seconds)
