"""Sharing hf_moe models on the Hugging Face Hub: model cards that record how the MoE was made, and upload.

Imports `hf_moe.modeling` only; nothing in `hf_moe.modeling` imports this package.
"""

from .cards import MODEL_CARD_TEMPLATE, render_model_card, save_model_card
from .upload import push_folder_to_hub

__all__ = ["MODEL_CARD_TEMPLATE", "push_folder_to_hub", "render_model_card", "save_model_card"]
