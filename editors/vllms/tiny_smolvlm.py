"""`tiny-smolvlm`: SmolVLM's classes at toy sizes, no download.

SmolVLM's SigLIP-style vision tower (2 layers, 32x32 tiles of 8x8 patches), the pixel-shuffle
connector (scale factor 2: 4 tokens per tile), a Llama LM (4 layers, width 64). Images are resized
to a longest edge of 64 px and split into tiles of 32 px (1x2, 2x1 or 2x2 grids) plus the global image:
12 or 20 image tokens with the row / column tokens between the tiles. The tokenizer is trained on the
spot with SmolVLM's special tokens (`<image>`, `<fake_token_around_image>`, `<global-img>`,
`<row_i_col_j>`, `<end_of_utterance>`); the chat template has SmolVLM's format ("User:" / "Assistant:").
`build(..., first_release=True)` gives the same model in the Idefics3 classes of the first release
(SmolVLM-Instruct; no registered tiny name: the tests save it in the real layout and load it as `smolvlm`).
"""
from __future__ import annotations

from .tiny import _MEAN, _STD, TinySpec
from .tokenizer import train_tokenizer

GRID = 2  # the most tiles per side (size / max_image_size)
SPECIALS = (["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>",
             "<video>"] + [f"<row_{r}_col_{c}>" for r in range(1, GRID + 1) for c in range(1, GRID + 1)])
# SmolVLM's chat format: "<|im_start|>User:" + images + text + "<end_of_utterance>\n", then "Assistant:"
TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def build(spec: TinySpec, prompt_mode: str, first_release: bool = False):
    """The tiny random backbone (`prompt_mode` "raw": the name ends in ":raw"); SmolVLM2's classes, or
    with `first_release` the Idefics3 classes of SmolVLM-Instruct."""
    from .hf_vlm import RAW_SUFFIX

    if first_release:
        from transformers import Idefics3Config as Config
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Images

        from .hf_smolvlm import SmolVLMIdefics3 as Backbone
    else:
        from transformers import SmolVLMConfig as Config
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as Images

        from .hf_smolvlm import SmolVLM as Backbone

    tile, scale = spec.image_size, 2
    tok = train_tokenizer(spec.vocab_size)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    image_processor = Images(
        size={"longest_edge": GRID * tile}, max_image_size={"longest_edge": tile}, image_mean=_MEAN, image_std=_STD)
    seq = (tile // spec.patch_size) ** 2 // scale ** 2
    processor = Backbone.processor_class(image_processor=image_processor, tokenizer=tok, image_seq_len=seq,
                                         chat_template=TEMPLATE)
    cfg = Config(
        vision_config=dict(hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                           num_hidden_layers=spec.vision_layers, num_attention_heads=spec.num_heads,
                           image_size=tile, patch_size=spec.patch_size, initializer_range=spec.vision_init_std),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=spec.hidden_size,
                         intermediate_size=2 * spec.hidden_size, num_hidden_layers=spec.num_layers,
                         num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads // 2,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False)
    name = "tiny-smolvlm" + "-idefics3" * first_release + RAW_SUFFIX * (prompt_mode == "raw")
    return Backbone(Backbone.hf_class(cfg), processor, name=name, prompt_mode=prompt_mode)
