"""InternVL3 (transformers' native `internvl` classes: `InternVLForConditionalGeneration`) as an `HFVLM`.

The processor cuts an image into 448x448 tiles (a grid close to the image's aspect ratio, 1 to
`max_patches` tiles, plus a thumbnail when there is more than one) and expands the `<IMG_CONTEXT>`
placeholder into `<img>` + `<IMG_CONTEXT>` x (image_seq_length x tiles) + `</img>`. The vision tower
(InternViT) sees each tile, a pixel shuffle folds 2x2 patches into one token, an MLP projects them:
`image_seq_length` LM tokens per tile, so the token count varies with the image's aspect ratio.

Layout of one row (chat mode; InternVL3's ChatML template):
    [<|im_start|>user\\n<img>][<IMG_CONTEXT> x n][</img>\\nprompt<|im_end|>\\n<|im_start|>assistant\\n][target][pad]
The vision span is the `<IMG_CONTEXT>` run (every tile of the image, thumbnail last). The LM is
Qwen2 (1-D rotary positions, `RotaryStack`).
"""
from __future__ import annotations

import os

import torch

from utils.errors import UserError
from .hf_vlm import HFVLM, image_only


def _classes():
    from transformers import InternVLForConditionalGeneration, InternVLProcessor

    return InternVLForConditionalGeneration, image_only(InternVLProcessor)


class InternVL(HFVLM):
    """InternVL3 (-hf releases): InternViT + pixel-shuffle MLP projector + Qwen2.5 LM, tiled images."""

    hf_class, processor_class = _classes()
    model_type = "internvl"
    family = "internvl"
    default_name = "internvl3-8b"
    image_text = "<IMG_CONTEXT>\n"

    @staticmethod
    def max_image_tokens(processor) -> int:
        """image_seq_length per tile x the most tiles (max_patches, plus the thumbnail when it can tile)."""
        most = int(processor.image_processor.max_patches)
        return int(processor.image_seq_length) * (most + (most > 1))

    @classmethod
    def from_directory(cls, path: str, **kwargs) -> "InternVL":
        """`HFVLM.from_directory`, then the processor's tokens per tile checked against the model's."""
        vllm = super().from_directory(path, **kwargs)
        vision = vllm.model.config.vision_config
        per_tile = round((vision.image_size[0] // vision.patch_size[0]) * (vision.image_size[1] // vision.patch_size[1])
                         * vllm.model.config.downsample_ratio ** 2)  # patches after the pixel shuffle
        said = vllm.processor.image_seq_length
        if said != per_tile:
            raise UserError(f"{os.path.join(path, 'processor_config.json')}: image_seq_length is {said} but the model "
                            f"in {path} makes {per_tile} tokens per tile; copy processor_config.json from the "
                            f"original model folder")
        return vllm

    def _features(self, extras: list[dict]):
        """Per image row [tiles x image_seq_length, d]: one encoder call over every tile of every row,
        then each row's tiles joined in order (the processor's order of the `<IMG_CONTEXT>` run)."""
        if not extras:
            return [], None
        tiles = [len(e["pixel_values"]) for e in extras]
        per_tile, _ = self.encode_images({"pixel_values": torch.cat([e["pixel_values"] for e in extras])})
        rows, start = [], 0
        for n in tiles:
            rows.append(torch.cat(per_tile[start:start + n]))  # [n * image_seq_length, d]
            start += n
        return rows, None
