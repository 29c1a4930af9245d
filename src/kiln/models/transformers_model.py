"""The part BLIP, BLIP-2 and BLIP-2 retrieval share: a transformers model and its processor,
split into components; each family says what it is (`describe`), what it exports
(`component_specs`) and how (`export_module`)."""

from __future__ import annotations

import abc
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.errors import SourceError, first_line
from kiln.models.sources import LoadedModel, SourceInfo, free_weights
from kiln.models.spec import ComponentSpec


class TransformersModel(LoadedModel):
    def __init__(self, model: Any, processor: Any, source: SourceInfo) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.info = self.describe(model)
        self._specs = self.component_specs()
        # Until the runner says otherwise: every component but the optional ones.
        self._pending = {name for name, spec in self._specs.items() if not spec.optional}

    @abc.abstractmethod
    def describe(self, model: Any) -> Any:
        """The family's model-info dataclass (refusing what the family cannot compile)."""

    @abc.abstractmethod
    def component_specs(self) -> dict[str, ComponentSpec]:
        """Every component, in export order (optional ones last)."""

    @staticmethod
    def load_pretrained(
        path: Path, model_class: Any, processor_class: Any, what: str
    ) -> tuple[Any, Any]:
        """(model in eval mode, processor) from a folder, or a one-line `SourceError`."""
        import torch

        try:
            model = model_class.from_pretrained(path, dtype=torch.float32)
            processor = processor_class.from_pretrained(path)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            reason = first_line(exc)
            raise SourceError(f"could not load the {what} model in {path}: {reason}") from None
        return model.eval(), processor

    def specs(self) -> dict[str, ComponentSpec]:
        return dict(self._specs)

    def will_export(self, components: Sequence[str]) -> None:
        self._pending = set(components)

    def release(self, component: str) -> None:
        # Components share weights (tied embeddings, the vision tower, the Q-Former): the
        # model goes as a whole once this run's components are exported.
        self._pending.discard(component)
        if not self._pending and self.model is not None:
            free_weights(self.model)  # exporters may still reference the parameters
            self.model = None
            gc.collect()

    def model_info(self) -> dict[str, Any]:
        return self.info.to_dict()

    def save_support_files(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(folder)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(folder)
        self.processor.save_pretrained(folder)
