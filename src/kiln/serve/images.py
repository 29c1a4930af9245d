"""Images over HTTP: base64 in (checked before decoding), PNG out, and cheap live previews."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from kiln.errors import InvalidRequestError

# The linear map from SD latents to RGB that AUTOMATIC1111's "Approx cheap" preview uses
# (fitted on SD 1.x/2.x and SDXL VAEs): a preview costs a 4x3 matrix product, not a VAE.
LATENT_RGB_SD = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
LATENT_RGB_SDXL = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)


def decode_image(text: Any, field: str, max_pixels: int, mode: str = "RGB") -> Any:
    """A PIL image from base64 text (a `data:` URL prefix allowed), its size checked first."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError(f"{field}: expected a base64-encoded image")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{field}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except (UnidentifiedImageError, OSError):
        raise InvalidRequestError(f"{field}: not a readable image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequestError(
            f"{field}: {width}x{height} is more than the {max_pixels} pixels this server takes"
        )
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise InvalidRequestError(f"{field}: the image data is truncated or corrupt") from None
    return image.convert(mode)


def encode_png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def latent_preview(latents: Any, xl: bool) -> Any:
    """A small RGB preview of the first image's latents (None for non-4-channel latents)."""
    import torch
    from PIL import Image

    if latents is None or latents.dim() != 4 or latents.shape[1] != 4:
        return None
    factors = torch.tensor(LATENT_RGB_SDXL if xl else LATENT_RGB_SD, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), factors)
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1).nan_to_num(0.0)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())
