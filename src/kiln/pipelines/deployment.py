"""`kiln.load()` and `Deployment`: one artifact, verified, planned and ready to run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from kiln.artifacts import Manifest, Variant, read_manifest, verify_files
from kiln.errors import ArtifactError, InvalidRequestError
from kiln.models.lora import LORA_COMPONENTS
from kiln.models.spec import ComponentSpec, Precision
from kiln.profiles.hardware import HardwareProfile, detect
from kiln.profiles.select import Plan, Policy, select
from kiln.profiles.targets import TargetProfile, target_for
from kiln.runtimes import open_for_check, open_session
from kiln.runtimes.base import Session
from kiln.versions import warn_version_drift

RETRIEVAL_ARCHITECTURES = ("BlipForImageTextRetrieval", "Blip2ForImageTextRetrieval")


class Deployment:
    """A loaded artifact: its manifest, the plan chosen for this machine, open sessions."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        plan: Plan,
        sessions: dict[str, Session],
        load_seconds: float,
        deferred: Mapping[str, Callable[[], Session]] | None = None,
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.plan = plan
        self.sessions = sessions
        self.load_seconds = load_seconds
        self._deferred = dict(deferred or {})

    def has_component(self, component: str) -> bool:
        return component in self.sessions or component in self._deferred

    def session(self, component: str) -> Session:
        """The component's session; an optional component opens on its first use."""
        if component not in self.sessions and component in self._deferred:
            self.sessions[component] = self._deferred.pop(component)()
        return self.sessions[component]

    @property
    def family(self) -> str:
        return self.manifest.family

    def nan_fallbacks(self) -> dict[str, int]:
        """Per guarded component, how many calls were rerun at fp32 after a NaN/inf."""
        return {
            name: session.fallback_calls
            for name, session in self.sessions.items()
            if getattr(session, "fallback_calls", 0)
        }

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidRequestError(
            f"{self.root} holds a {self.family} model; generate() is for Stable Diffusion"
        )

    def caption(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidRequestError(
            f"{self.root} holds a {self.family} model; caption() is for BLIP models"
        )

    def match(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidRequestError(
            f"{self.root} holds a {self.family} model; match() is for BLIP and BLIP-2 "
            "retrieval models"
        )

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidRequestError(
            f"{self.root} holds a {self.family} model; embed() is for BLIP and BLIP-2 "
            "retrieval models"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, family={self.family!r})\n{self.plan}"


def load(
    path: str | os.PathLike[str],
    *,
    prefer: Sequence[str] | str = (),
    require: Sequence[str] | str = (),
    profile: HardwareProfile | None = None,
    target_profile: TargetProfile | str | os.PathLike[str] | None = None,
    objective: str | None = None,
    drift_budget: Mapping[str, float] | Sequence[str] | None = None,
    verify: bool = True,
    guard: bool = True,
    loras: Mapping[str, float] | Sequence[str] | None = None,
    embeddings: Sequence[str | os.PathLike[str]] = (),
    switch_loras: bool = False,
) -> Deployment:
    """Load an artifact folder: verify its files, pick variants for this machine, open them.

    `prefer`/`require` take `runtime[:precision][@device]` strings (`onnx:fp32`,
    `unet=openvino:int8`, `vae_decoder=onnx@cpu`, or a variant id `unet/openvino/int8`).
    `target_profile` is a `TargetProfile`, a built-in target name (`"intel-cpu-amx"`) or a
    TOML file; by default the built-in target that matches `profile` is used.
    `objective` is `"latency"`, `"throughput"` or `"memory"`; `drift_budget` maps metric to
    limit (`{"psnr": 25}` or `["psnr=25"]`). Both default to what `kiln optimize` recorded in
    the manifest (`manifest.selection`), else `"latency"` and `DEFAULT_DRIFT_BUDGET`; so do
    OpenVINO's fixed-shape copies (`static_shapes`, see `kiln.runtimes.openvino`).
    `guard` wraps reduced-precision components in the NaN guard (`kiln.runtimes.guard`).
    Stable Diffusion only: `loras` (`{"FILE": 0.8}` or `["FILE:0.8"]`) are switched on at load
    without re-export (`Deployment.set_loras` changes them later); `embeddings` are
    textual-inversion files whose tokens (file key or stem) prompts may then use. Either, or
    `switch_loras=True` (LoRAs to come, as a server with a LoRA folder), plans only variants
    whose weights can change at load (fp32, fp16, bf16) for the UNet and text encoders.
    A planned variant made with another torch, transformers, diffusers, onnxruntime or
    openvino than the installed one raises a `LibraryVersionWarning` naming both versions.
    """
    started = time.perf_counter()
    root = Path(path)
    manifest = read_manifest(root)
    if not manifest.variants:
        raise ArtifactError(f"{root} has no exported variants yet; run `kiln export` into it")
    defaults = manifest.selection
    extra: dict[str, Any] = {"objective": objective or defaults.get("objective", "latency")}
    if loras or embeddings or switch_loras:
        extra["weight_changes"] = LORA_COMPONENTS
    if drift_budget is None:
        drift_budget = defaults.get("drift_budget")
    if not prefer and not require and defaults.get("prefer"):
        prefer = defaults["prefer"]
        extra["prefer_origin"] = "kiln optimize: the fastest whole plan measured here"
    if drift_budget is not None:
        extra["drift_budget"] = drift_budget
    policy = Policy.from_strings(
        [prefer] if isinstance(prefer, str) else list(prefer),
        [require] if isinstance(require, str) else list(require),
        **extra,
    )
    profile = profile or detect()
    plan = select(manifest, profile, policy, target_for(profile, target_profile))
    warn_version_drift(root, (manifest.variant(c.variant_id) for c in plan.choices))
    if verify:
        verify_files(root, manifest.support_files)
        for choice in plan.choices:
            verify_files(root, manifest.variant(choice.variant_id).files)
    sessions, deferred = {}, {}
    for choice in plan.choices:
        spec = ComponentSpec.from_dict(manifest.components[choice.component])
        if choice.runtime == "openvino" and "static_shapes" in defaults:
            # kiln optimize measured OpenVINO with fixed-shape copies for the shapes each
            # component runs at: load them the way they were measured.
            options = {"static_shapes": defaults["static_shapes"], **choice.options}
            choice = replace(choice, options=options)
        opener = partial(_open_planned, root, manifest, choice, spec, guard)
        if spec.optional:
            deferred[choice.component] = opener
        else:
            sessions[choice.component] = opener()
    seconds = time.perf_counter() - started
    args = (root, manifest, plan, sessions, seconds)
    if manifest.family == "stable-diffusion":
        from kiln.pipelines.diffusion import DiffusionDeployment

        deployment = DiffusionDeployment(*args, deferred=deferred)
        for embedding in embeddings:
            deployment.load_textual_inversion(embedding)
        deployment.set_loras(loras)
        return deployment
    if loras or embeddings:
        raise InvalidRequestError(
            f"LoRAs and embeddings are for Stable Diffusion; {root} holds a {manifest.family} model"
        )
    if manifest.model_info.get("architecture") in RETRIEVAL_ARCHITECTURES:
        from kiln.pipelines.retrieval import RetrievalDeployment

        return RetrievalDeployment(*args, deferred=deferred)
    if manifest.family == "blip":
        from kiln.pipelines.captioning import CaptioningDeployment

        return CaptioningDeployment(*args, deferred=deferred)
    if manifest.family == "blip2":
        from kiln.pipelines.captioning import Blip2CaptioningDeployment

        return Blip2CaptioningDeployment(*args, deferred=deferred)
    return Deployment(*args, deferred=deferred)


def _open_planned(
    root: Path, manifest: Manifest, choice: Any, spec: ComponentSpec, guard: bool
) -> Session:
    variant = manifest.variant(choice.variant_id)
    session = open_session(root, variant, spec, choice)
    fallback = _fallback_for(manifest, variant) if guard else None
    if fallback is not None:
        session = _guarded(root, session, variant, fallback, spec, choice)
    return session


def _fallback_for(manifest: Manifest, variant: Variant) -> Variant | None:
    """The variant a reduced-precision one falls back to: fp32, else bf16; same target first."""
    if variant.precision is Precision.FP32:
        return None
    ranked = sorted(
        (
            v
            for v in manifest.variants_of(variant.component)
            if v.precision in (Precision.FP32, Precision.BF16) and v.id != variant.id
        ),
        key=lambda v: (v.precision is not Precision.FP32, v.target != variant.target),
    )
    return ranked[0] if ranked else None


def _guarded(
    root: Path, session: Session, variant: Variant, fallback: Variant, spec: ComponentSpec, choice
) -> Session:
    from kiln.runtimes.guard import GuardedSession

    def open_fallback() -> Session:
        verify_files(root, fallback.files)
        if fallback.target == variant.target:
            return open_session(root, fallback, spec, replace(choice, variant_id=fallback.id))
        return open_for_check(root / fallback.entry, spec, fallback.target, root=root)

    return GuardedSession(session, variant.id, fallback.id, open_fallback)
