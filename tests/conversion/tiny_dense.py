"""Tiny dense T5 settings and inputs shared by the conversion tests (moefy, merge, dense_from_moe)."""

from __future__ import annotations

import torch

T5_FIELDS = dict(
    vocab_size=99,
    d_model=32,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    d_kv=8,
    decoder_start_token_id=0,
)
# T5 v1.0 (ReLU FFN, tied embeddings) and v1.1 (gated GELU FFN, untied)
T5_KINDS = {
    "v1.0": dict(feed_forward_proj="relu"),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
INPUT_IDS = torch.randint(2, 99, (2, 9), generator=torch.Generator().manual_seed(1))
T5_INPUTS = dict(
    input_ids=torch.randint(2, 99, (2, 7), generator=torch.Generator().manual_seed(1)),
    decoder_input_ids=torch.randint(2, 99, (2, 5), generator=torch.Generator().manual_seed(2)),
)
