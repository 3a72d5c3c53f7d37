"""`hf-moe distill`: a tiny copy-upcycled GPT-2 MoE teacher distilled into a dense student and a Mixture-of-Students,
with perplexities checked against a reference computed here; bad inputs are one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

import hf_moe
from hf_moe.cli.distill import TOKENIZER_VOCABULARY_FILES
from hf_moe.cli.main import main
from hf_moe.conversion.save import TOKENIZER_FILES
from tests.cli.conftest import TQDM_BAR, error_lines, snapshot
from tests.conftest import tiny_word_tokenizer

BLOCK = 16
STEPS = 4


@pytest.fixture
def distill_workspace(tmp_path, saved_models) -> Path:
    """tmp_path with `teacher/` (the saved MoE plus the word tokenizer), `dense/`, `moe/` (no tokenizer), `text.txt`."""
    shutil.copytree(saved_models["moe"], tmp_path / "teacher")
    tiny_word_tokenizer().save_pretrained(tmp_path / "teacher")
    for name in ("dense", "moe"):
        shutil.copytree(saved_models[name], tmp_path / name)
    rng = random.Random(0)
    lines = []
    for _ in range(60):
        start = rng.randrange(3, 90)
        lines.append(" ".join(f"w{start + i % 8}" for i in range(rng.randrange(8, 24))))
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def reference_perplexity(model, blocks_NS: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every block position after the first, from the logits."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=blocks_NS).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks_NS[:, 1:].reshape(-1))
    return math.exp(nll.item())


def held_out_blocks(folder: Path, text: Path, num_eval: int) -> torch.Tensor:
    """The last `num_eval` blocks of the text tokenized here: one document, eos after it."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(text.read_text())["input_ids"] + [tokenizer.eos_token_id]
    usable = len(ids) // BLOCK * BLOCK
    return torch.tensor(ids[:usable]).view(-1, BLOCK)[-num_eval:]


def distill(ws: Path, *extra: str) -> int:
    return main(
        ["distill", str(ws / "teacher"), str(ws / "out"), "--text-files", str(ws / "text.txt")]
        + ["--max-steps", str(STEPS), "--block-size", str(BLOCK), "--batch-size", "4", "--learning-rate", "1e-2"]
        + list(extra)
    )


@pytest.mark.parametrize(
    ("student", "extra", "student_class"),
    [("dense", [], GPT2LMHeadModel), ("mos", ["--experts", "2"], hf_moe.GPT2MoeForCausalLM)],
)
def test_distill_trains_saves_and_measures(distill_workspace, capsys, student, extra, student_class):
    ws = distill_workspace
    assert distill(ws, "--student", student, *extra) == 0
    captured = capsys.readouterr()
    assert TQDM_BAR.search(captured.err), "Trainer's progress bar"
    assert f"wrote {ws / 'out'}" in captured.out

    out = ws / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["student"] == student and metrics["steps"] == STEPS and metrics["block_size"] == BLOCK
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(trained, student_class) and metrics["student_class"] == student_class.__name__
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(ws / "teacher").get_vocab()

    eval_NS = held_out_blocks(ws / "teacher", ws / "text.txt", metrics["eval_blocks"])
    # 10% of the blocks, rounded up, are held out
    assert metrics["eval_blocks"] == math.ceil(0.1 * (metrics["train_blocks"] + metrics["eval_blocks"]))
    teacher = AutoModelForCausalLM.from_pretrained(ws / "teacher")
    assert metrics["teacher_perplexity"] == pytest.approx(reference_perplexity(teacher, eval_NS), rel=1e-5)
    if student == "dense":
        # a copy-upcycled teacher's dense student (mean of identical experts) is the teacher's function
        before = reference_perplexity(hf_moe.dense_from_moe(teacher), eval_NS)
    else:
        # the default keeps every other layer: layer 1 of 2
        before = reference_perplexity(hf_moe.mixture_of_students(teacher, [1], 2), eval_NS)
        assert trained.config.n_layer == 1 and trained.config.num_local_experts == 2
    assert metrics["student_perplexity_before"] == pytest.approx(before, rel=1e-5)
    # the saved model is the trained one, and training moved it
    assert metrics["student_perplexity_after"] == pytest.approx(reference_perplexity(trained, eval_NS), rel=1e-5)
    assert all(math.isfinite(metrics[key]) for key in ("teacher_perplexity", "student_perplexity_after"))
    assert abs(math.log(metrics["student_perplexity_after"] / metrics["student_perplexity_before"])) > 1e-3


def test_the_vocabulary_files_looked_for_are_tokenizer_files():
    assert set(TOKENIZER_VOCABULARY_FILES) <= set(TOKENIZER_FILES)


def _no_tokenizer(ws: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ws / "teacher" / name).unlink()


def _full_out(ws: Path) -> None:
    (ws / "out").mkdir()
    (ws / "out" / "keep.txt").write_text("mine\n")


TEXT = ["--text-files", "{ws}/text.txt"]
# (case, argv, fragments the one error line must contain, what to change first)
CASES = [
    ("missing teacher", ["distill", "{ws}/gone", "{ws}/out", "--student", "dense", *TEXT], ["TEACHER {ws}/gone", "not found"], None),
    ("dense teacher", ["distill", "{ws}/dense", "{ws}/out", "--student", "dense", *TEXT], ["'gpt2'", "not an hf_moe MoE model"], None),
    ("no tokenizer", ["distill", "{ws}/moe", "{ws}/out", "--student", "dense", *TEXT], ["{ws}/moe has no tokenizer", "tokenizer.json"], None),
    ("too many experts", ["distill", "{ws}/teacher", "{ws}/out", "--student", "mos", "--experts", "5", *TEXT], ["--experts 5", "choose 2..4"], None),
    ("ffn out of range", ["distill", "{ws}/teacher", "{ws}/out", "--student", "dense", "--ffn", "4", *TEXT], ["--ffn 4", "0..3"], None),
    ("ffn not an index", ["distill", "{ws}/teacher", "{ws}/out", "--student", "dense", "--ffn", "-1", *TEXT], ["--ffn", "must be 'mean' or an expert index >= 0, got -1"], None),
    ("ffn with mos", ["distill", "{ws}/teacher", "{ws}/out", "--student", "mos", "--ffn", "0", *TEXT], ["--ffn applies only with --student dense"], None),
    ("OUT not empty", ["distill", "{ws}/teacher", "{ws}/out", "--student", "dense", *TEXT], ["OUT {ws}/out is not empty", "--overwrite"], _full_out),
    ("negative alpha", ["distill", "{ws}/teacher", "{ws}/out", "--student", "dense", "--alpha", "-0.1", *TEXT], ["--alpha", "[0, 1]"], None),
    ("unknown student", ["distill", "{ws}/teacher", "{ws}/out", "--student", "tiny", *TEXT], ["--student", "'dense', 'mos'"], None),
    ("missing text", ["distill", "{ws}/teacher", "{ws}/out", "--student", "dense", "--text-files", "{ws}/none.txt"], ["--text-files", "{ws}/none.txt"], None),
    ("text too short", ["distill", "{ws}/teacher", "{ws}/out", "--student", "dense", "--block-size", "1000", *TEXT], ["too few for one training and one held-out block of 1000"], None),
    ("tokenizer removed", ["distill", "{ws}/teacher", "{ws}/out", "--student", "dense", *TEXT], ["has no tokenizer"], _no_tokenizer),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "fragments", "prepare"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(distill_workspace, capsys, argv, fragments, prepare):
    ws = distill_workspace
    if prepare is not None:
        prepare(ws)
    before = snapshot(ws)
    capsys.readouterr()
    assert main([part.format(ws=ws) for part in argv]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("hf-moe distill: error: "), lines
    for fragment in fragments:
        assert fragment.format(ws=ws) in lines[0], lines[0]
    assert snapshot(ws) == before
