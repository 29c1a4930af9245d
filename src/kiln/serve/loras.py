"""AUTOMATIC1111's LoRA prompt syntax over a folder of LoRA files: `<lora:name:0.8>`.

A tag names a file in the server's `--lora-dir` by its stem (searched in subfolders too, as
A1111 does) with an optional multiplier (default 1). Tags are taken out of the prompt before
it is encoded; the job then runs with exactly those LoRAs switched on at load, and a job
without tags runs on the artifact's own weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.errors import InvalidRequestError

TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::([^>]*))?>", re.IGNORECASE)


class LoraLibrary:
    """The LoRA files a server offers, by name."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def files(self) -> dict[str, Path]:
        if self.folder is None or not self.folder.is_dir():
            return {}
        found: dict[str, Path] = {}
        for path in sorted(self.folder.rglob("*.safetensors")):
            found.setdefault(path.stem, path)
        return found

    def describe(self) -> list[dict[str, Any]]:
        """What `/sdapi/v1/loras` lists (A1111's fields)."""
        return [
            {"name": name, "alias": name, "path": str(path), "metadata": {}}
            for name, path in self.files().items()
        ]

    def take_tags(self, prompt: str | Sequence[str]) -> tuple[str | list[str], dict[str, float]]:
        """The prompt without its tags, and the LoRA files they name with their scales."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        found = [self._parse(text) for text in prompts]
        loras = found[0][1]
        if any(tags != loras for _, tags in found):
            raise InvalidRequestError(
                "every prompt of one request must name the same <lora:...> tags"
            )
        cleaned = [text for text, _ in found]
        return (cleaned[0] if isinstance(prompt, str) else cleaned), loras

    def _parse(self, text: str) -> tuple[str, dict[str, float]]:
        tags = list(TAG.finditer(text))
        if not tags:
            return text, {}
        files = self.files()
        loras: dict[str, float] = {}
        for tag in tags:
            name, scale, extra = tag.group(1).strip(), tag.group(2), tag.group(3)
            if extra is not None:
                raise InvalidRequestError(
                    f"<lora:{name}:...>: separate text-encoder and UNet weights are not "
                    "supported; give one multiplier"
                )
            if self.folder is None:
                raise InvalidRequestError(
                    f"the prompt names <lora:{name}> but this server has no --lora-dir"
                )
            if name not in files:
                offered = ", ".join(files) or "none"
                raise InvalidRequestError(
                    f"no LoRA named {name!r} in {self.folder} (it has: {offered})"
                )
            try:
                value = 1.0 if scale in (None, "") else float(scale)
            except ValueError:
                raise InvalidRequestError(
                    f"<lora:{name}:{scale}>: the multiplier must be a number"
                ) from None
            path = str(files[name])
            loras[path] = loras.get(path, 0.0) + value
        cleaned = re.sub(r"\s{2,}", " ", TAG.sub("", text)).strip(" ,")
        return cleaned, loras
