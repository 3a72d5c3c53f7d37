"""The conversion report: what moefy changed, returned to the caller and saved as JSON beside the model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["REPORT_FILENAME", "ConversionReport"]

REPORT_FILENAME = "moefy_report.json"


@dataclass
class ConversionReport:
    source_model: str  # path or Hub id, or the class name of an in-memory model
    source_model_type: str
    source_class: str
    target_class: str
    init_method: str
    init_options: dict
    seed: int
    num_experts: int | list[int]  # a list: one count per MoE layer (PR-MoE)
    top_k: int
    router_type: str
    moe_layers: list[int] | dict[str, list[int]]  # GPT-2: indices; T5: {"encoder": [...], "decoder": [...]}
    parameters: dict[str, int]  # total, active (per token), experts
    dense_parameters: int
    versions: dict[str, str] = field(default_factory=dict)  # hf_moe, transformers, torch
    # how the router rows started: "random" (from the seed), "kmeans" or "hidden_prompts" (from data, router_init.py)
    router_init: str = "random"

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / REPORT_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ConversionReport:
        return cls(**json.loads((Path(folder) / REPORT_FILENAME).read_text()))
