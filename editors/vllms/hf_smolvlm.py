"""SmolVLM through the processor-driven adapter (`hf_vlm.py`): SmolVLM2 (transformers' `smolvlm` classes)
and the first release, SmolVLM-Instruct (an `idefics3` model: the same layout in Idefics3's classes).

SigLIP vision tower on fixed-size tiles, a pixel-shuffle connector (scale_factor^2 patches -> one
token, then a linear projection), a Llama LM (SmolLM2). The processor resizes an image so its
longest edge is `size.longest_edge`, splits it into a rows x cols grid of `max_image_size` tiles and
adds the whole image at tile size (the global image); each tile becomes `image_seq_len` `<image>`
tokens, with text between the tiles:
    <fake><row_1_col_1><image> x s <fake><row_1_col_2><image> x s \\n ... \\n<fake><global-img><image> x s<fake>
The vision span a LiveEdit-style editor reads is the block from the first to the last `<image>` token
(tiles, the row / column tokens and newlines between them). Layout of a row in chat mode:
    [<s><|im_start|>User:][tiles and global image][<end_of_utterance>\\nAssistant:][target]
Positions are 1-D (the LM's own rotary embeddings).
"""
from __future__ import annotations

import math

from .hf_tiles import join_tiles
from .hf_vlm import HFVLM


def _classes():
    from transformers import SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        # SmolVLMProcessor's own __init__ insists on num2words, which only words video frame counts:
        # the same token attributes here, read from the tokenizer when it names them
        for attr, default in (("fake_image_token", "<fake_token_around_image>"), ("image_token", "<image>"),
                              ("end_of_utterance_token", "<end_of_utterance>"),
                              ("global_image_token", "<global-img>"), ("video_token", "<video>")):
            setattr(self, attr, getattr(tokenizer, attr, default))
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_seq_len = image_seq_len
        ProcessorMixin.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # SmolVLMProcessor's adds the video processor's frame settings; images and text need none
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    processor = type(SmolVLMProcessor.__name__, (SmolVLMProcessor,),
                     {"__init__": __init__, "apply_chat_template": apply_chat_template, "__module__": __name__})
    return SmolVLMForConditionalGeneration, processor


class SmolVLM(HFVLM):
    """SmolVLM2: tiles of a SigLIP tower, pixel-shuffle connector, Llama (SmolLM2) LM."""

    hf_class, processor_class = _classes()
    model_type = "smolvlm"
    family = "smolvlm2"
    default_name = "smolvlm2-2b"
    image_text = "<image>"  # the processor expands it into the tiles and the global image

    @staticmethod
    def language_model(model):
        return model.model.text_model, model.lm_head

    @staticmethod
    def max_image_tokens(processor) -> int:
        """Tokens of the largest image block: a full grid of tiles (each `image_seq_len` image tokens, a
        <fake> and a <row_i_col_j> token; a newline per grid row) and the global image (its
        image tokens, <fake><global-img>...<fake> and the newline before it)."""
        ip = processor.image_processor
        side = math.ceil(ip.size["longest_edge"] / ip.max_image_size["longest_edge"])  # tiles per grid side
        seq = processor.image_seq_len
        return side * side * (seq + 2) + side + 1 + seq + 3

    def _features(self, extras: list[dict]):
        """One vision call for all image rows: rows have different tile counts ([1, tiles, 3, H, W]
        each), zero-padded to the most (the model drops all-zero tiles, see `hf_tiles.py`)."""
        if not extras:
            return [], None
        return self.encode_images(join_tiles(extras, self._feature_args))


def _idefics3_classes():
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

    return Idefics3ForConditionalGeneration, Idefics3Processor  # images and text only already


class SmolVLMIdefics3(SmolVLM):
    """SmolVLM-Instruct, the first release: SmolVLM2's layout and parts in transformers' Idefics3 classes
    (its config.json says model_type "idefics3")."""

    hf_class, processor_class = _idefics3_classes()
    model_type = "idefics3"
    family = "smolvlm"
    default_name = "smolvlm-2b"
