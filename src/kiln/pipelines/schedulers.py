"""Schedulers by name: diffusers' names and the ones AUTOMATIC1111 users know."""

from __future__ import annotations

from typing import Any

from kiln.errors import InvalidRequestError

# name -> (diffusers class, extra config). Karras variants change the sigma schedule.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

ALIASES = {
    "euler a": "euler_a",
    "euler_ancestral": "euler_a",
    "eulerancestral": "euler_a",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++2m": "dpmpp_2m",
    "dpm++ 2m karras": "dpmpp_2m_karras",
    "dpmsolver": "dpmpp_2m",
}


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key.replace("-", "_").replace(" ", "_"))
    if key not in SCHEDULERS:
        raise InvalidRequestError(
            f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}"
        )
    return key


def make_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A scheduler of the named kind configured from the model's own scheduler config."""
    import diffusers

    class_name, extra = SCHEDULERS[canonical_name(name)]
    return getattr(diffusers, class_name).from_config(base_config, **extra)
