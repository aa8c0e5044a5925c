"""Backbones stored as one Hugging Face folder: model, tokenizer and image processor side by side."""
from __future__ import annotations

import torch

from .base import VLLM
from .hf_parts import check_processor_file, check_tokenizer_files, load_image_processor, load_tokenizer
from .load_report import AllowList, check_hf_loading_info
from .placement import check_module_names
from .weight_files import hf_weight_files


class HFFolderVLLM(VLLM):
    """`save` / `from_directory` for BLIP-2 and LLaVA; subclasses name the transformers class."""

    hf_class: type = None     # e.g. Blip2ForConditionalGeneration
    default_name: str = ""    # the real backbone's full name
    allowed_keys: AllowList = AllowList()  # the family's harmless missing / unexpected checkpoint keys

    def save(self, directory: str) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    @classmethod
    def from_directory(cls, path: str, device="cpu", dtype=None, name: str | None = None,
                       device_map: str | dict | None = None) -> "HFFolderVLLM":
        """Load the folder's weights directly in `dtype` (default float32) after checking its files.

        `device_map` ("auto" or {module name: device}, see `placement.py`): each weight is read straight
        onto its device by transformers instead of all of them onto `device`.

        Cheap checks first (tokenizer and processor files, every shard named by the index present
        and complete); then any missing, unexpected or differently shaped key is a UserError
        (transformers would only warn and initialise it at random).
        """
        check_tokenizer_files(path)
        check_processor_file(path)
        hf_weight_files(path)
        placed = {}
        if device_map is not None:
            if isinstance(device_map, dict):
                check_module_names(cls.meta_model(path), device_map, "--device_map")
            placed = {"device_map": device_map}
        model, info = cls.hf_class.from_pretrained(path, dtype=dtype or torch.float32, output_loading_info=True,
                                                   ignore_mismatched_sizes=True, **placed)
        check_hf_loading_info(path, cls.allowed_keys, info, tied=model.config.get_text_config().tie_word_embeddings)
        return cls(model if placed else model.to(device), load_tokenizer(path), load_image_processor(path),
                   name=name or cls.default_name)

    @classmethod
    def meta_model(cls, path: str) -> torch.nn.Module:
        """The folder's model with no storage (meta device): its module names, to check a device map first."""
        config = cls.hf_class.config_class.from_pretrained(path)
        with torch.device("meta"):
            return cls.hf_class(config)
