"""Render the example card `example_gpt2_moe_card.md`: GPT-2 small upcycled to 8 experts, top-2, in every other block.

Only a config and a hand-written conversion report are needed (no model is built or downloaded), so the example stays
in step with the template; `tests/hub/test_cards.py` regenerates it and compares.

    python model_cards/render_example.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from hf_moe import GPT2MoeConfig
from hf_moe.hub import render_model_card

EXAMPLE_NAME = "example_gpt2_moe_card.md"

# what `hf-moe moefy openai-community/gpt2 gpt2-moe-8x2 --num-experts 8 --top-k 2 --moe-layers every_other
# --init drop_upcycle --capacity-factor 1.25` reports; fixed versions keep the example stable
SAMPLE_REPORT = {
    "source_model": "openai-community/gpt2",
    "source_model_type": "gpt2",
    "source_class": "GPT2LMHeadModel",
    "target_class": "GPT2MoeForCausalLM",
    "init_method": "drop_upcycle",
    "init_options": {"drop_ratio": 0.5},
    "seed": 0,
    "num_experts": 8,
    "top_k": 2,
    "router_type": "topk",
    "moe_layers": [1, 3, 5, 7, 9, 11],
    "dense_parameters": 124_439_808,
    "versions": {"hf_moe": "0.1.0", "transformers": "5.24.0", "torch": "2.13.0"},
}


def main(out_dir: str | Path = Path(__file__).parent) -> Path:
    """Write the example card into `out_dir` and return its path."""
    config = GPT2MoeConfig(
        num_experts=8,
        num_experts_per_tok=2,
        moe_layers=SAMPLE_REPORT["moe_layers"],
        capacity_factor=1.25,
        architectures=["GPT2MoeForCausalLM"],
    )
    card = render_model_card(
        config,
        report=SAMPLE_REPORT,
        base_model="openai-community/gpt2",
        license="mit",
        repo_id="your-name/gpt2-moe-8x2",
        training_results={"train_loss": 3.1416, "epochs": 1, "steps": 800},
        eval_results={"eval_loss": 3.2189, "perplexity": 25.0},
    )
    path = Path(out_dir) / EXAMPLE_NAME
    card.save(path)
    return path


if __name__ == "__main__":
    print(main(*sys.argv[1:2]))
