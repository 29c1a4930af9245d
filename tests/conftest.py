"""Session fixtures: tiny models are built and exported once per test run.

Nothing here touches the network: models come from `kiln.models.tiny` (random weights,
locally written tokenizers) and are loaded back from disk like real ones.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from kiln.models.tiny import save_pipeline  # noqa: E402

TINY_SD = ("sd1", "sd2", "sdxl", "sd1-inpaint")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip, with the reason, where torch sees no CUDA device."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if gpu_tests and not _cuda_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {preset: save_pipeline(preset, root / preset, seed=0) for preset in TINY_SD}


class _Artifacts:
    """Exports a tiny model on first request and keeps the artifact for the session."""

    def __init__(self, models: dict[str, Path], root: Path) -> None:
        self.models, self.root, self.cache = models, root, {}

    def __getitem__(self, preset: str) -> Path:
        if preset not in self.cache:
            import kiln

            out = self.root / preset
            kiln.export(self.models[preset], out)
            self.cache[preset] = out
        return self.cache[preset]


@pytest.fixture(scope="session")
def artifacts(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> _Artifacts:
    return _Artifacts(tiny_models, tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def served_blip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny BLIP captioner and ITM artifacts, exported once for the servers' tests."""
    import kiln
    from kiln.models.tiny_captioning import save_model

    root = tmp_path_factory.mktemp("served-blip")
    out = {}
    for preset, name in (("blip", "blip-captions"), ("blip-itm", "blip-match")):
        model = save_model(preset, root / preset, seed=0)
        out[preset] = root / name
        kiln.export(model, out[preset])
    return out


@pytest.fixture(scope="session")
def both_targets(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD1 exported to ONNX and OpenVINO into one artifact."""
    import kiln

    pytest.importorskip("openvino")
    out = tmp_path_factory.mktemp("ov") / "sd1"
    kiln.export(tiny_models["sd1"], out, targets=["onnx", "openvino"])
    return out


@pytest.fixture(scope="session")
def loras(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per preset: two LoRAs in diffusers format and the first also under kohya keys."""
    pytest.importorskip("peft", reason="LoRA tests need the lora extra (PEFT)")
    from lora_helpers import make_lora, to_kohya

    out = {}
    for preset in ("sd1", "sd2", "sdxl"):
        root = tmp_path_factory.mktemp(f"lora-{preset}")
        first = make_lora(tiny_models[preset], root / "a", seed=1)
        second = make_lora(tiny_models[preset], root / "b", seed=2)
        kohya = to_kohya(first, root / "a-kohya.safetensors", xl=preset == "sdxl")
        out[preset] = {"a": first, "b": second, "a-kohya": kohya}
    return out


@pytest.fixture(scope="session")
def shapes_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The built-in trained models (`kiln:shapes-sd`, `kiln:shapes-blip`) exported to ONNX once."""
    import kiln

    root = tmp_path_factory.mktemp("shapes")
    out = {}
    for name in ("shapes-sd", "shapes-blip"):
        out[name] = root / name
        kiln.export(f"kiln:{name}", out[name])
    return out
