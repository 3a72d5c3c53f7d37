"""moefy's data-driven router inits: "kmeans" rows are the k-means centroids of the dense FFN inputs, "hidden_prompts"
rows the mean FFN input of each expert's prompts; both families, determinism, training, bad input, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from hf_moe.cli.main import main
from hf_moe.conversion import moefy
from hf_moe.conversion.router_init import (
    ROUTER_INITS,
    capture_ffn_inputs,
    kmeans_centroids,
    prepare_calibration,
    router_rows,
)
from hf_moe.modeling import moe_routers
from tests.cli.conftest import error_lines, snapshot
from tests.conftest import tiny_word_tokenizer

NUM_EXPERTS = 4
# word texts of different lengths (12..47 tokens), so batches hold padding; every text fits one sequence (64 positions)
TEXTS = [" ".join(f"w{(7 * i + 5 * j * j) % 96 + 3}" for j in range(12 + (11 * i) % 36)) for i in range(24)]
PROMPTS = ["w3 w4 w5", ["w10 w11", "w12 w13 w14 w15"], "w50", "w90 w91 w92 w93 w94 w95"]


def save_dense(folder: Path, family: str) -> Path:
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, pad_token_id=1)
        GPT2LMHeadModel(config).save_pretrained(folder)
    else:
        config = T5Config(
            vocab_size=99, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
            decoder_start_token_id=0, pad_token_id=1,
        )  # fmt: skip
        T5ForConditionalGeneration(config).save_pretrained(folder)
    tiny_word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("router_init")
    return {family: save_dense(root / family, family) for family in ("gpt2", "t5")}


def dense_ffns(dense) -> list[torch.nn.Module]:
    """Each layer's dense FFN, written out by hand (not from the family mapping), in moefy's plan order."""
    if isinstance(dense, GPT2LMHeadModel):
        return [block.mlp for block in dense.transformer.h]
    encoder = [block.layer[1].DenseReluDense for block in dense.encoder.block]
    return encoder + [block.layer[2].DenseReluDense for block in dense.decoder.block]


@torch.no_grad()
def reference_ffn_inputs(dense, token_lists: list[list[int]]) -> tuple[list[torch.Tensor], list[int]]:
    """Each dense FFN's input at every token, one unpadded sequence at a time (so there is no padding to exclude),
    T5's decoder fed the same ids shifted right behind decoder_start_token_id; and the tokens per sequence."""
    ffns = dense_ffns(dense)
    captured = [[] for _ in ffns]
    hooks = [
        ffn.register_forward_pre_hook(lambda module, args, i=i: captured[i].append(args[0][0].clone()))
        for i, ffn in enumerate(ffns)
    ]
    try:
        for ids in token_lists:
            ids_1S = torch.tensor([ids])
            if isinstance(dense, T5ForConditionalGeneration):
                decoder_ids_1S = torch.tensor([[dense.config.decoder_start_token_id, *ids[:-1]]])
                dense(input_ids=ids_1S, decoder_input_ids=decoder_ids_1S)
            else:
                dense(input_ids=ids_1S)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(parts) for parts in captured], [len(ids) for ids in token_lists]


def load_dense(folder: Path):
    cls = GPT2LMHeadModel if folder.name == "gpt2" else T5ForConditionalGeneration
    return cls.from_pretrained(folder).eval()


def router_weights(moe) -> list[torch.Tensor]:
    return [router.weight.detach().clone() for _, router in moe_routers(moe)]


def token_ids(texts) -> list[list[int]]:
    tokenizer = tiny_word_tokenizer()
    return [tokenizer(text)["input_ids"] for text in texts]


# --- kmeans ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_kmeans_rows_are_the_centroids_of_the_dense_ffn_inputs(folders, family):
    folder = folders[family]
    moe = moefy(folder, num_experts=NUM_EXPERTS, top_k=2, router_init="kmeans", calibration_data=TEXTS, seed=3)
    dense = load_dense(folder)
    reference, _ = reference_ffn_inputs(dense, token_ids(TEXTS))
    assert len(reference) == len(moe_routers(moe)) == (2 if family == "gpt2" else 4)
    assert reference[0].shape == (sum(len(ids) for ids in token_ids(TEXTS)), 32)

    # moefy's capture (batched, padded, through the family mapping) gives exactly the FFN inputs at the real tokens
    calibration = prepare_calibration("kmeans", TEXTS, tiny_word_tokenizer(), dense.config, num_experts=NUM_EXPERTS)
    names = ["h.0.mlp", "h.1.mlp"] if family == "gpt2" else [
        "encoder.block.0.layer.1.DenseReluDense", "encoder.block.1.layer.1.DenseReluDense",
        "decoder.block.0.layer.2.DenseReluDense", "decoder.block.1.layer.2.DenseReluDense",
    ]  # fmt: skip
    captured, _ = capture_ffn_inputs(dense, names, calibration)
    for name, states_ND in zip(names, reference, strict=True):
        torch.testing.assert_close(captured[name], states_ND, rtol=1e-5, atol=1e-5)

    generator = torch.Generator().manual_seed(3)  # the layers draw from one generator, in plan order
    for weight_ED, states_ND in zip(router_weights(moe), reference, strict=True):
        centroids_ED = kmeans_centroids(states_ND, NUM_EXPERTS, generator=generator)
        torch.testing.assert_close(weight_ED, router_rows(centroids_ED, 0.02), rtol=1e-5, atol=1e-6)
        # the defining property: each token's best expert is its k-means cluster (nearest centroid by cosine)
        cluster_N = (states_ND / states_ND.norm(dim=1, keepdim=True) @ centroids_ED.T).argmax(dim=1)
        best_N = (states_ND @ weight_ED.T).argmax(dim=1)
        assert (best_N == cluster_N).float().mean() > 0.99
        assert torch.bincount(best_N, minlength=NUM_EXPERTS).min() > 0  # every expert gets tokens
        # rows: the centroids scaled to a random row's norm, minus their mean (which shifts every logit alike)
        expected = 0.02 * math.sqrt(32) * (centroids_ED - centroids_ED.mean(0))
        torch.testing.assert_close(weight_ED, expected, rtol=1e-5, atol=1e-6)


def test_kmeans_finds_separated_clusters_and_stops_at_a_fixed_point():
    generator = torch.Generator().manual_seed(0)
    directions_ED = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    scales_N = torch.rand(800, 1, generator=generator) * 5 + 0.5  # cosine clustering ignores the norm
    points_ND = (directions_ED.repeat(200, 1) + 0.05 * torch.randn(800, 16, generator=generator)) * scales_N
    centroids_ED = kmeans_centroids(points_ND, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(centroids_ED.norm(dim=1), torch.ones(4))
    similarity_EE = centroids_ED @ directions_ED.T
    assert similarity_EE.max(dim=1).values.min() > 0.99  # every centroid is one of the true directions...
    assert set(similarity_EE.argmax(dim=1).tolist()) == {0, 1, 2, 3}  # ...and every direction is found
    # fixed point: each centroid is the normalized mean of the points most similar to it
    unit_ND = torch.nn.functional.normalize(points_ND, dim=1)
    cluster_N = (unit_ND @ centroids_ED.T).argmax(dim=1)
    for cluster in range(4):
        mean_D = unit_ND[cluster_N == cluster].mean(0)
        torch.testing.assert_close(centroids_ED[cluster], mean_D / mean_D.norm(), rtol=1e-5, atol=1e-6)
    # degenerate data (two distinct points, three clusters) still gives finite unit rows
    few_ND = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    centroids_ED = kmeans_centroids(few_ND, 3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(centroids_ED).all() and torch.allclose(centroids_ED.norm(dim=1), torch.ones(3))


def test_kmeans_is_deterministic_in_the_seed_and_leaves_the_experts_alone(folders):
    folder = folders["gpt2"]
    options = dict(num_experts=NUM_EXPERTS, top_k=2, init="noise", calibration_data=TEXTS, router_init="kmeans")
    first, again = moefy(folder, seed=0, **options), moefy(folder, seed=0, **options)
    for (name, tensor), other in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(tensor, other), name
    # a dense model in training mode is read in eval mode (no dropout) and left in training mode
    dense = GPT2LMHeadModel.from_pretrained(folder).train()
    from_object = moefy(dense, seed=0, **options)
    assert dense.training and from_object.training
    assert all(torch.equal(a, b) for a, b in zip(router_weights(from_object), router_weights(first), strict=True))
    other_seed = moefy(folder, seed=1, **options)
    assert not torch.equal(torch.stack(router_weights(first)), torch.stack(router_weights(other_seed)))
    # the experts' seeded draws are the ones router_init="random" gets: only the routers differ
    random_init = moefy(folder, seed=0, num_experts=NUM_EXPERTS, top_k=2, init="noise")
    for name, tensor in random_init.state_dict().items():
        assert torch.equal(tensor, first.state_dict()[name]) != (".router." in name), name


def test_the_calibration_token_budget_takes_the_first_tokens(folders):
    dense_config = GPT2Config.from_pretrained(folders["gpt2"])
    calibration = prepare_calibration(
        "kmeans", TEXTS, tiny_word_tokenizer(), dense_config, num_experts=NUM_EXPERTS, calibration_tokens=100
    )
    flat = [i for ids in token_ids(TEXTS) for i in ids]
    assert calibration.num_tokens == 100
    assert [i for sequence in calibration.sequences for i in sequence] == flat[:100]
    # a Dataset's "text" column reads like the list of its texts
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    from_dataset = prepare_calibration(
        "kmeans", dataset, tiny_word_tokenizer(), dense_config, num_experts=NUM_EXPERTS, calibration_tokens=100
    )
    assert from_dataset.sequences == calibration.sequences
    # a text longer than the model's 64 positions is cut into sequences of at most 64
    long_text = " ".join(f"w{3 + j % 90}" for j in range(150))
    calibration = prepare_calibration("kmeans", [long_text], tiny_word_tokenizer(), dense_config, num_experts=4)
    assert [len(sequence) for sequence in calibration.sequences] == [64, 64, 22]


def test_a_kmeans_model_routes_differently_from_random_and_trains(folders):
    folder = folders["gpt2"]
    random_init = moefy(folder, num_experts=NUM_EXPERTS, top_k=2)
    kmeans = moefy(folder, num_experts=NUM_EXPERTS, top_k=2, router_init="kmeans", calibration_data=TEXTS)
    reference, _ = reference_ffn_inputs(load_dense(folder), token_ids(TEXTS))
    for states_ND, random_ED, kmeans_ED in zip(
        reference, router_weights(random_init), router_weights(kmeans), strict=True
    ):
        same_N = (states_ND @ random_ED.T).argmax(1) == (states_ND @ kmeans_ED.T).argmax(1)
        assert same_N.float().mean() < 0.6  # chance agreement of two unrelated routings is about 1 / E
    kmeans.train()
    optimizer = torch.optim.AdamW(kmeans.parameters(), lr=1e-2)
    ids_BS = torch.tensor([ids[:12] for ids in token_ids(TEXTS[:4])])
    before = router_weights(kmeans)
    loss = kmeans(ids_BS, labels=ids_BS).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(router.weight.grad.abs().sum() > 0 for _, router in moe_routers(kmeans))
    optimizer.step()
    assert all(not torch.equal(old, new) for old, new in zip(before, router_weights(kmeans), strict=True))
    assert kmeans(ids_BS, labels=ids_BS).loss < loss


# --- hidden_prompts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "router_init_std"), [("gpt2", 0.02), ("t5", 0.1)])
def test_hidden_prompts_rows_are_the_mean_states_of_each_experts_prompts(folders, family, router_init_std):
    folder = folders[family]
    overrides = {} if router_init_std == 0.02 else {"router_init_std": router_init_std}
    moe = moefy(
        folder, num_experts=NUM_EXPERTS, top_k=2, router_init="hidden_prompts", expert_prompts=PROMPTS, **overrides
    )
    prompt_lists = [[entry] if isinstance(entry, str) else entry for entry in PROMPTS]
    reference, lengths = reference_ffn_inputs(load_dense(folder), token_ids([p for ps in prompt_lists for p in ps]))
    for weight_ED, states_ND in zip(router_weights(moe), reference, strict=True):
        prompt_means = [part.mean(0) for part in states_ND.split(lengths)]
        experts = []
        for expert, prompts in enumerate(prompt_lists):
            first = sum(len(p) for p in prompt_lists[:expert])
            mean_D = torch.stack(prompt_means[first : first + len(prompts)]).mean(0)
            experts.append(mean_D / mean_D.norm())
        directions_ED = torch.stack(experts)
        expected = router_init_std * math.sqrt(32) * (directions_ED - directions_ED.mean(0))
        torch.testing.assert_close(weight_ED, expected, rtol=1e-5, atol=1e-6)
        # each expert is the best one for the mean state of its own prompts
        assert torch.equal((directions_ED @ weight_ED.T).argmax(1), torch.arange(NUM_EXPERTS))


# --- bad input ------------------------------------------------------------------------------------------------------

BAD_INPUTS = [
    (dict(router_init="magic"), ValueError, r"router_init must be one of \('random', 'kmeans', 'hidden_prompts'\)"),
    (dict(router_init="kmeans"), ValueError, "router_init='kmeans' clusters .* pass calibration_data"),
    (dict(router_init="hidden_prompts"), ValueError, "pass expert_prompts, 4 entries"),
    (dict(router_init="hidden_prompts", expert_prompts=PROMPTS[:3]), ValueError, "has 3 entries; it needs one per expert"),
    (dict(router_init="hidden_prompts", expert_prompts="w3"), TypeError, "expert_prompts must be a list of 4"),
    (dict(router_init="hidden_prompts", expert_prompts=["w3", [], "w4", "w5"]), TypeError, r"expert_prompts\[1\]"),
    (dict(router_init="hidden_prompts", expert_prompts=["w3", " ", "w4", "w5"]), ValueError, "empty prompt"),
    (dict(router_init="kmeans", calibration_data=TEXTS, expert_prompts=PROMPTS), ValueError, "expert_prompts applies only with router_init='hidden_prompts'"),
    (dict(calibration_data=TEXTS), ValueError, "calibration_data applies only with router_init='kmeans'"),
    (dict(router_init="hidden_prompts", expert_prompts=PROMPTS, calibration_tokens=10), ValueError, "calibration_tokens applies only"),
    (dict(router_init="kmeans", calibration_data=TEXTS, calibration_tokens=0), ValueError, "calibration_tokens must be an int >= 1"),
    (dict(router_init="kmeans", calibration_data="w3 w4"), TypeError, "not a single string"),
    (dict(router_init="kmeans", calibration_data=[Path("/nonexistent/calib.txt")]), FileNotFoundError, "calib.txt"),
    (dict(router_init="kmeans", calibration_data=[3]), TypeError, "got a int"),
    (dict(router_init="kmeans", calibration_data=["w3 w4"]), ValueError, "needs at least num_experts=4 calibration tokens .*; calibration_data gave 2"),
    (dict(router_init="kmeans", calibration_data=TEXTS, num_experts=1, top_k=1), ValueError, "nothing to route"),
    (dict(router_init="kmeans", calibration_data=TEXTS, router_type="hash", top_k=1), ValueError, "router_type='hash' learns nothing"),
]  # fmt: skip


def test_bad_inputs_are_named_before_the_weights_load(tmp_path):
    folder = save_dense(tmp_path / "gpt2", "gpt2")
    (folder / "model.safetensors").unlink()  # any check that came after the weight load would fail on this instead
    for arguments, error, message in BAD_INPUTS:
        with pytest.raises(error, match=message):
            moefy(folder, **{"num_experts": NUM_EXPERTS, "top_k": 2, **arguments})
    datasets = pytest.importorskip("datasets")
    with pytest.raises(ValueError, match=r"calibration_data needs a 'text' column; the dataset has \['body'\]"):
        moefy(folder, router_init="kmeans", calibration_data=datasets.Dataset.from_dict({"body": TEXTS}))
    for tokenizer_file in folder.glob("tokenizer*"):
        tokenizer_file.unlink()
    with pytest.raises(
        ValueError, match="router_init='kmeans' feeds its text to the dense model .* no tokenizer files"
    ):
        moefy(folder, num_experts=NUM_EXPERTS, top_k=2, router_init="kmeans", calibration_data=TEXTS)
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="'hidden_prompts' feeds .* not loaded from a folder"):
        moefy(dense, num_experts=NUM_EXPERTS, top_k=2, router_init="hidden_prompts", expert_prompts=PROMPTS)


# --- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_router_inits_write_the_rows_moefy_makes(tmp_path, capsys):
    folder = save_dense(tmp_path / "dense", "gpt2")
    corpus = tmp_path / "calibration.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(PROMPTS))
    argv = ["moefy", str(folder), str(tmp_path / "kmeans"), "--num-experts", "4", "--router-init", "kmeans"]
    assert main([*argv, "--calibration-data", str(corpus), "--calibration-tokens", "300"]) == 0
    expected = moefy(folder, num_experts=4, router_init="kmeans", calibration_data=[corpus], calibration_tokens=300)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "kmeans")
    assert all(torch.equal(a, b) for a, b in zip(router_weights(saved), router_weights(expected), strict=True))
    argv = ["moefy", str(folder), str(tmp_path / "prompts"), "--num-experts", "4", "--router-init", "hidden_prompts"]
    assert main([*argv, "--expert-prompts-file", str(prompts_file)]) == 0
    expected = moefy(folder, num_experts=4, router_init="hidden_prompts", expert_prompts=PROMPTS)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "prompts")
    assert all(torch.equal(a, b) for a, b in zip(router_weights(saved), router_weights(expected), strict=True))


CLI_CASES = [
    (["--calibration-data", "{ws}/calibration.txt"], ["--calibration-data applies only with --router-init kmeans"]),
    (["--calibration-tokens", "5"], ["--calibration-tokens applies only with --router-init kmeans"]),
    (["--router-init", "kmeans"], ["--router-init kmeans", "--calibration-data FILE"]),
    (["--router-init", "kmeans", "--calibration-data", "{ws}/nope.txt"], ["--calibration-data: no such file", "nope.txt"]),
    (["--router-init", "kmeans", "--expert-prompts-file", "{ws}/prompts.json"], ["--expert-prompts-file applies only with --router-init hidden_prompts"]),
    (["--router-init", "hidden_prompts"], ["--expert-prompts-file FILE", "4 entries"]),
    (["--router-init", "hidden_prompts", "--expert-prompts-file", "{ws}/calibration.txt"], ["is not JSON"]),
    (["--router-init", "hidden_prompts", "--expert-prompts-file", "{ws}/three.json"], ["has 3 entries", "--num-experts 4"]),
    (["--router-init", "hidden_prompts", "--expert-prompts-file", "{ws}/nested.json"], ["must hold a JSON list"]),
    (["--router-init", "kmeans", "--router-type", "hash", "--top-k", "1", "--calibration-data", "{ws}/calibration.txt"], ["--router-type hash has none"]),
    (["--router-init", "centroids"], ["--router-init", "'centroids'", "hidden_prompts"]),
]  # fmt: skip


@pytest.mark.parametrize(("options", "fragments"), CLI_CASES, ids=[" ".join(case[0][:2]) for case in CLI_CASES])
def test_cli_router_init_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, options, fragments):
    (tmp_path / "dense").mkdir()  # never read: every case fails before the source is looked at
    (tmp_path / "calibration.txt").write_text("w3 w4\n")
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    (tmp_path / "three.json").write_text(json.dumps(PROMPTS[:3]))
    (tmp_path / "nested.json").write_text(json.dumps(["w3", [["w4"]], "w5", "w6"]))
    before = snapshot(tmp_path)
    argv = ["moefy", str(tmp_path / "dense"), str(tmp_path / "out"), "--num-experts", "4"]
    code = main([*argv, *(option.format(ws=tmp_path) for option in options)])
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("hf-moe moefy: error: ")
    for fragment in fragments:
        assert fragment.format(ws=tmp_path) in lines[0], lines[0]
    assert snapshot(tmp_path) == before


def test_the_cli_router_inits_are_the_librarys():
    from hf_moe.cli.moefy import ROUTER_INITS as CLI_ROUTER_INITS

    assert CLI_ROUTER_INITS == ROUTER_INITS
