"""The keyword names diffusers' and transformers' users already type, beside kiln's short ones.

`generate(prompt, num_inference_steps=4)` must work for a diffusers user as `steps=4` does,
and a name kiln does not take must be refused by name rather than with a `TypeError` or, worse,
silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kiln.errors import InvalidRequestError


def take_aliases(
    call: str,
    given: Mapping[str, Any],
    aliases: Mapping[str, str],
    own: Mapping[str, tuple[Any, Any]],
    accepted: str,
) -> dict[str, Any]:
    """kiln's values (`own`: kiln name -> (value, default)) with the library spellings in
    `given` applied (`aliases`: library name -> kiln name).

    Names that are neither kiln's nor an alias are refused; so is an alias given beside its
    kiln name with another value. `accepted` lists kiln's own names for the message.
    """
    unknown = sorted(set(given) - set(aliases))
    if unknown:
        raise InvalidRequestError(
            f"{call} does not take {unknown[0]!r}; it takes {accepted}, "
            f"and {', '.join(sorted(aliases))}"
        )
    values = {name: value for name, (value, _) in own.items()}
    for alias, value in given.items():
        name = aliases[alias]
        current, default = own[name]
        if current != default and current != value:
            raise InvalidRequestError(
                f"{call} got {name}={current!r} and {alias}={value!r}; pass one of them"
            )
        values[name] = value
    return values
