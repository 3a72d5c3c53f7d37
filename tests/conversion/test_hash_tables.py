"""Hash tables (Roller et al. 2021): the balanced and clustered builders' defining properties, token counting,
writing tables into a model, and moefy(router_type="hash")."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_moe.modeling.routing_hash
from hf_moe.conversion import (
    balanced_hash_table,
    clustered_hash_table,
    moefy,
    random_hash_table,
    set_hash_tables,
    token_frequencies,
)
from hf_moe.modeling import moe_routers
from hf_moe.training.text_data import read_corpus, train_bpe_tokenizer
from tests.conftest import tiny_gpt2_moe_config, tiny_word_tokenizer

from .test_moefy_t5 import dense_t5


@pytest.fixture(scope="module")
def stdlib_corpus():
    """~300 KB of Python source (on every machine), a byte-level BPE trained on it, and its token counts."""
    documents = read_corpus(max_chars=200_000)
    tokenizer = train_bpe_tokenizer(documents, vocab_size=512, special_tokens=["<|endoftext|>"])
    return documents, tokenizer, token_frequencies(tokenizer, documents, progress=False)


def loads(table_HV: torch.Tensor, counts_V: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(H, E) corpus tokens each expert receives from each head."""
    return torch.stack([torch.bincount(row, weights=counts_V.double(), minlength=num_experts) for row in table_HV])


# --- balanced -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads", [1, 2])
def test_balanced_hash_loads_are_within_5_percent_on_its_own_corpus(stdlib_corpus, num_heads):
    _, _, counts_V = stdlib_corpus
    total, num_experts = counts_V.sum().item(), 8
    group = num_experts // num_heads
    assert counts_V.max() < 0.8 * total / group  # the corpus can be balanced: no token is an expert's load alone
    table_HV = balanced_hash_table(counts_V, num_experts, num_heads=num_heads)
    load_HE = loads(table_HV, counts_V, num_experts)
    for head in range(num_heads):
        in_group = load_HE[head, head * group : (head + 1) * group]
        assert load_HE[head].sum() == total == in_group.sum()  # each head's experts are its own group's
        assert (in_group - total / group).abs().max() <= 0.05 * total / group, in_group.tolist()
    # random hashing of the same corpus is far from that: the balance is the table's doing
    random_load_E = loads(random_hash_table(counts_V.numel(), num_experts), counts_V, num_experts)[0]
    assert (random_load_E - total / num_experts).abs().max() > 0.05 * total / num_experts


def test_balanced_hash_is_the_greedy_packing_of_the_paper():
    # decreasing frequency, each token to the least-loaded expert: 10->0, 7->1, 6->1, 3->0, 2->0 (tie: 13, 13);
    # the unseen tokens 5, 6, 7 to the experts with fewest ids: 1 (2 ids), then 1 (less load), then 0
    counts_V = torch.tensor([10, 7, 6, 3, 2, 0, 0, 0])
    assert balanced_hash_table(counts_V, 2).tolist() == [[0, 1, 1, 0, 0, 1, 1, 0]]
    assert torch.equal(balanced_hash_table(counts_V, 2, seed=5), balanced_hash_table(counts_V, 2, seed=0))


def test_unseen_tokens_are_spread_evenly():
    counts_V = torch.tensor([100, 1, 1, 1] + [0] * 96)
    table_HV = balanced_hash_table(counts_V, 4)
    assert torch.bincount(table_HV[0], minlength=4).tolist() == [25, 25, 25, 25]


def test_multi_head_balanced_tables_differ_between_heads(stdlib_corpus):
    _, _, counts_V = stdlib_corpus
    table_HV = balanced_hash_table(counts_V, 8, num_heads=2, seed=0)
    head_0, head_1 = table_HV[0], table_HV[1] - 4
    # no relabeling of the experts turns one head into the other: tokens that share an expert in head 0 are split
    # over several experts in head 1
    assert all(len(set(head_1[head_0 == expert].tolist())) > 1 for expert in range(4))
    assert torch.equal(table_HV, balanced_hash_table(counts_V, 8, num_heads=2, seed=0))
    assert not torch.equal(table_HV, balanced_hash_table(counts_V, 8, num_heads=2, seed=1))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((torch.ones(2, 3), 2), "1-D tensor of token counts"),
        ((torch.tensor([1.0, -1.0]), 2), "finite and >= 0"),
        ((torch.ones(8), 4, 3), "num_experts=4 must be a multiple of num_heads=3"),
        ((torch.ones(8), 0), "num_experts must be an int >= 1"),
    ],
)
def test_balanced_hash_bad_input(arguments, message):
    with pytest.raises(ValueError, match=message):
        balanced_hash_table(*arguments)


# --- clustered ------------------------------------------------------------------------------------------------------


def test_clustered_hash_puts_each_cluster_on_one_expert():
    generator = torch.Generator().manual_seed(0)
    centers_CD = torch.randn(4, 8, generator=generator) * 20
    blob_V = torch.arange(60) % 4  # token id t lies in blob t % 4
    embeddings_VD = centers_CD[blob_V] + torch.randn(60, 8, generator=generator)
    table_HV = clustered_hash_table(embeddings_VD, 4)
    experts_of_blob = [set(table_HV[0, blob_V == blob].tolist()) for blob in range(4)]
    assert all(len(experts) == 1 for experts in experts_of_blob)
    assert len(set.union(*experts_of_blob)) == 4  # different blobs, different experts


def test_clustered_hash_is_a_k_means_fixed_point_and_deterministic():
    embeddings_VD = torch.randn(99, 6, generator=torch.Generator().manual_seed(1))
    table_HV = clustered_hash_table(embeddings_VD, 4, num_heads=2, seed=3)
    assert torch.equal(table_HV, clustered_hash_table(embeddings_VD, 4, num_heads=2, seed=3))
    for head in range(2):
        experts_V = table_HV[head] - 2 * head
        assert set(experts_V.tolist()) == {0, 1}
        # every token is nearest to the centroid of its own expert's tokens (k-means converged)
        centroids_GD = torch.stack([embeddings_VD[experts_V == e].mean(0) for e in range(2)])
        assert torch.equal(torch.cdist(embeddings_VD, centroids_GD).argmin(1), experts_V)


def test_clustered_hash_bad_input():
    with pytest.raises(ValueError, match="2-D float tensor"):
        clustered_hash_table(torch.arange(10), 2)
    with pytest.raises(ValueError, match="needs at least 4 token embeddings"):
        clustered_hash_table(torch.randn(3, 2), 4)


# --- token counts ---------------------------------------------------------------------------------------------------


def test_token_frequencies_of_files_texts_and_datasets_agree(tmp_path):
    tokenizer = tiny_word_tokenizer()
    texts = ["w3 w3 w5", "w5 w7\nw3", "w98"]
    files = []
    for index, text in enumerate(texts):
        files.append(tmp_path / f"part{index}.txt")
        files[-1].write_text(text)
    expected_V = torch.zeros(99, dtype=torch.long)
    expected_V[[3, 5, 7, 98]] = torch.tensor([3, 2, 1, 1])
    assert torch.equal(token_frequencies(tokenizer, files, progress=False), expected_V)
    assert torch.equal(token_frequencies(tokenizer, (t for t in texts), progress=False), expected_V)
    dataset = datasets.Dataset.from_dict({"body": texts})
    assert torch.equal(token_frequencies(tokenizer, dataset, text_column="body", progress=False), expected_V)
    assert token_frequencies(tokenizer, texts, vocab_size=120, progress=False).shape == (120,)


def test_token_frequencies_bad_input(tmp_path):
    tokenizer = tiny_word_tokenizer()
    with pytest.raises(TypeError, match="not a single string"):
        token_frequencies(tokenizer, "w3 w4")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        token_frequencies(tokenizer, [tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="needs a 'text' column; the dataset has \\['body'\\]"):
        token_frequencies(tokenizer, datasets.Dataset.from_dict({"body": ["w3"]}))
    with pytest.raises(ValueError, match="outside vocab_size=50"):
        token_frequencies(tokenizer, ["w3 w60"], vocab_size=50, progress=False)
    (tmp_path / "named.txt").write_text("w3")
    with pytest.warns(UserWarning, match="pass pathlib.Path"):
        token_frequencies(tokenizer, [str(tmp_path / "named.txt")], progress=False)


# --- set_hash_tables ----------------------------------------------------------------------------------------------


def test_set_hash_tables_writes_every_router_and_the_kind():
    from hf_moe import GPT2MoeForCausalLM

    model = GPT2MoeForCausalLM(tiny_gpt2_moe_config(router_type="hash", num_experts_per_tok=2, num_hash_heads=2))
    table_HV = balanced_hash_table(torch.arange(99), 4, num_heads=2)
    set_hash_tables(model, table_HV, "balanced")
    assert all(torch.equal(router.expert_of_token, table_HV) for _, router in moe_routers(model))
    assert model.config.hash_kind == "balanced"


def test_set_hash_tables_errors_change_nothing():
    from hf_moe import GPT2MoeForCausalLM

    with pytest.raises(ValueError, match="router_type='topk'"):
        set_hash_tables(GPT2MoeForCausalLM(tiny_gpt2_moe_config()), torch.zeros(1, 99, dtype=torch.long), "random")
    model = GPT2MoeForCausalLM(tiny_gpt2_moe_config(router_type="hash", num_experts_per_tok=2, num_hash_heads=2))
    before = moe_routers(model)[0][1].expert_of_token.clone()
    good_HV = torch.stack([torch.zeros(99), torch.full((99,), 2)]).long()
    cases = [
        (good_HV[0], ValueError, r"shape \(num_hash_heads, vocab_size\) = \(2, 99\), got \(99,\)"),
        (good_HV[:, :50], ValueError, r"got \(2, 50\)"),
        (good_HV.float(), TypeError, "integer expert ids"),
        (good_HV.flip(0), ValueError, r"head 0 of table_HV must hold experts of its group \[0, 2\).*token 0 has expert 2"),
    ]  # fmt: skip
    for table, error, message in cases:
        with pytest.raises(error, match=message):
            set_hash_tables(model, table, "balanced")
    with pytest.raises(ValueError, match="kind must be one of"):
        set_hash_tables(model, good_HV, "sorted")
    assert torch.equal(moe_routers(model)[0][1].expert_of_token, before) and model.config.hash_kind == "random"


def test_there_is_one_random_table_implementation():
    assert random_hash_table is hf_moe.modeling.routing_hash.random_hash_table


# --- moefy ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def dense_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, pad_token_id=1)
    folder = tmp_path / "dense"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tiny_word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    # a skewed word corpus: w{i} occurs about 200 / i times
    words = [f"w{i}" for i in range(3, 99) for _ in range(200 // i)]
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(words) + "\n")
    return path


def test_moefy_balanced_uses_the_source_tokenizer_and_the_corpus(dense_folder, corpus_file):
    moe = moefy(
        dense_folder, num_experts=4, router_type="hash", top_k=1, hash_kind="balanced", hash_corpus=[corpus_file]
    )
    counts_V = token_frequencies(tiny_word_tokenizer(), [corpus_file], vocab_size=99, progress=False)
    expected_HV = balanced_hash_table(counts_V, 4, seed=0)
    assert not torch.equal(expected_HV, random_hash_table(99, 4))
    assert all(torch.equal(router.expert_of_token, expected_HV) for _, router in moe_routers(moe))
    assert moe.config.hash_kind == "balanced" and moe.config.router_type == "hash"


def test_moefy_clustered_and_random_tables(dense_folder):
    dense = GPT2LMHeadModel.from_pretrained(dense_folder)
    moe = moefy(dense, num_experts=4, router_type="hash", top_k=2, num_hash_heads=2, hash_kind="clustered", seed=2)
    expected_HV = clustered_hash_table(dense.transformer.wte.weight, 4, num_heads=2, seed=2)
    assert all(torch.equal(router.expert_of_token, expected_HV) for _, router in moe_routers(moe))
    assert moe.config.hash_kind == "clustered"
    moe = moefy(dense_t5(), num_experts=4, router_type="hash", top_k=1, seed=5)  # random by default, seeded by seed
    assert moe.config.hash_kind == "random" and moe.config.hash_seed == 5
    routers = moe_routers(moe)
    assert routers and all(
        torch.equal(router.expert_of_token, random_hash_table(99, 4, seed=5)) for _, router in routers
    )


def test_moefy_hash_bad_input(dense_folder, corpus_file, tmp_path):
    cases = [
        (dict(hash_kind="balanced"), ValueError, "hash_kind='balanced' balances the experts' loads on a corpus: pass hash_corpus"),
        (dict(router_type="topk", hash_kind="random"), ValueError, "hash_kind apply only with router_type='hash'"),
        (dict(router_type="topk", num_hash_heads=2), ValueError, "num_hash_heads apply only with router_type='hash'"),
        (dict(hash_corpus=[corpus_file]), ValueError, "hash_corpus applies only with hash_kind='balanced'"),
        (dict(top_k=2), ValueError, "pass top_k=1"),
        (dict(hash_kind="sorted"), ValueError, "hash_kind must be one of"),
        (dict(hash_kind="balanced", hash_corpus=[tmp_path / "nope.txt"]), FileNotFoundError, "nope.txt"),
        (dict(hash_kind="balanced", hash_corpus=42), TypeError, "hash_corpus must be text files"),
    ]  # fmt: skip
    for arguments, error, message in cases:
        with pytest.raises(error, match=message):
            moefy(dense_folder, **{"num_experts": 4, "top_k": 1, "router_type": "hash", **arguments})
    for tokenizer_file in dense_folder.glob("tokenizer*"):
        tokenizer_file.unlink()
    with pytest.raises(ValueError, match="has no tokenizer files"):
        moefy(dense_folder, num_experts=4, top_k=1, router_type="hash", hash_kind="balanced", hash_corpus=corpus_file)
    with pytest.raises(ValueError, match="not loaded from a folder"):
        moefy(dense_t5(), num_experts=4, top_k=1, router_type="hash", hash_kind="balanced", hash_corpus=corpus_file)
