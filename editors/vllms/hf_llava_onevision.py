"""LLaVA-OneVision (transformers' `llava_onevision`) through the processor-driven adapter (`hf_vlm.py`).

SigLIP vision tower, a 2-layer MLP projector, Qwen2 LM. The processor crops each image into a base
tile of the whole image plus the tiles of the best grid of `image_grid_pinpoints` (anyres); the
model packs the grid tiles' features row by row with the learned `image_newline` vector after each
row, unpads them to the image's aspect ratio, and puts the base tile's features first. Every one of
these positions is an `<image>` token in the text, so the vision span of a row is one run:
    [<s><|im_start|>user ][<image> x n][\\nprompt<|im_end|>\\n<|im_start|>assistant\\n][target]
n = base tokens + grid tokens + one newline per grid row; it depends on the image's size and aspect
ratio. Positions are 1-D (the LM's own rotary embeddings).
"""
from __future__ import annotations

from .hf_tiles import join_tiles
from .hf_vlm import HFVLM, image_only


def _classes():
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    return LlavaOnevisionForConditionalGeneration, image_only(LlavaOnevisionProcessor)


class LlavaOneVision(HFVLM):
    """LLaVA-OneVision: anyres tiles of a SigLIP tower, newline vectors between grid rows, Qwen2 LM."""

    hf_class, processor_class = _classes()
    model_type = "llava_onevision"
    family = "llava-onevision"
    default_name = "llava-onevision-7b"
    image_text = "<image>\n"  # the chat template's image text (images first, then a newline and the text)

    @staticmethod
    def max_image_tokens(processor) -> int:
        """Image tokens of the largest grid: an image with a pinpoint's exact size (no unpadding) gives
        the most tokens of that grid (the processor's own count, `anyres_max` cap included)."""
        ip = processor.image_processor
        tile = ip.size["height"] if "height" in ip.size else ip.size["shortest_edge"]
        most = max(processor._get_number_of_features(h, w, tile, tile) for h, w in ip.image_grid_pinpoints)
        return most - (processor.vision_feature_select_strategy == "default")

    def _features(self, extras: list[dict]):
        """One vision call for all image rows: rows have different tile counts ([1, tiles, 3, H, W]
        each), zero-padded to the most (the model keeps each row's own tiles, see `hf_tiles.py`)."""
        if not extras:
            return [], None
        return self.encode_images(join_tiles(extras, self._feature_args))

