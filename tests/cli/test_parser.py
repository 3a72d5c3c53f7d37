"""The parser: defaults in --help, registry names in the help text, and no torch / transformers import to build it."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import fields

from hf_moe.cli.main import main
from hf_moe.modeling.registry import ROUTERS

HEAVY = ("torch", "transformers", "hf_moe.modeling", "hf_moe.conversion")

# `hf_moe/__init__.py` imports the whole library, so the CLI's own laziness is checked with the package replaced by a
# bare namespace: what is imported then is what hf_moe.cli itself imports
_WITH_A_BARE_PACKAGE = """
import importlib.util, json, sys, types
spec = importlib.util.find_spec("hf_moe")
package = types.ModuleType("hf_moe")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["hf_moe"] = package
from hf_moe.cli.main import build_parser, main
codes = [main(argv) for argv in {argvs}]
print(json.dumps({{"codes": codes, "heavy": [name for name in {heavy} if name in sys.modules]}}))
"""


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)


def test_building_the_parser_and_help_import_no_torch():
    argvs = [["--help"], ["moefy", "--help"], ["inspect", "--help"], ["distill", "--help"]]
    argvs.append(["moefy", "src", "out", "--top-k", "0"])
    result = _run_python(_WITH_A_BARE_PACKAGE.format(argvs=argvs, heavy=HEAVY))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 0, 0, 0, 2], "heavy": []}
    assert "--top-k: must be an integer >= 1, got 0" in result.stderr


def test_the_console_script_answers_help_and_usage_errors_without_torch():
    # the entry point (`hf_moe_cli`) parses under a bare package; only a command line that parses imports hf_moe
    code = (
        "import sys, hf_moe_cli; codes = [hf_moe_cli.main(a) for a in (['--help'], ['moefy', '--help'], "
        "['inspect'])]; print(codes, [m for m in %r if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code % (HEAVY,)], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 2] []"
    assert "hf-moe inspect: error: the following arguments are required: PATH" in result.stderr


def test_the_console_script_runs_a_command_with_the_real_package(tmp_path):
    import hf_moe
    from tests.conftest import tiny_gpt2_moe_config

    hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config()).save_pretrained(tmp_path)
    code = f"import sys, hf_moe_cli; sys.exit(hf_moe_cli.main(['inspect', {str(tmp_path)!r}, '--json']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and '"model_type": "gpt2_moe"' in result.stdout, result.stderr[-2000:]


def test_help_lists_every_subcommand_and_returns_0(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("moefy", "inspect", "demo"))


def _help(capsys, command: str) -> str:
    capsys.readouterr()
    assert main([command, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width


def test_moefy_help_shows_defaults_and_every_registered_name(capsys):
    from hf_moe.conversion import INIT_METHODS
    from hf_moe.modeling.dispatch import CAPACITY_SCOPES, DROP_POLICIES
    from hf_moe.modeling.registry import BALANCE_LOSSES, ROUTERS

    text = _help(capsys, "moefy")
    for name in (*ROUTERS, *BALANCE_LOSSES, *INIT_METHODS, *DROP_POLICIES, *CAPACITY_SCOPES):
        assert name in text, f"the moefy help text does not name the registered {name!r}"
    for shown in (
        "--num-experts E experts per MoE layer",
        "e.g. 4,4,8,8; with --init copy, noise or drop_upcycle) (default: 8)",
        "--top-k K",
        "(default: 2)",
        "(default: copy)",
    ):
        assert shown in text


def test_the_defaults_the_help_states_are_the_library_defaults(capsys):
    # the help cannot import the library, so its stated defaults are text: check them against the source of truth
    from hf_moe.conversion import moefy
    from hf_moe.modeling.configuration_moe import MoeConfigFields

    text = _help(capsys, "moefy")
    signature = inspect.signature(moefy).parameters
    for option, parameter in (("--noise-scale", "noise_scale"), ("--drop-ratio", "drop_ratio")):
        assert f"{option} " in text and f"(default: {signature[parameter].default})" in text
    assert f"(default: {signature['split_partition'].default})" in text
    assert signature["router_type"].default == "topk" and signature["init"].default == "copy"
    config_defaults = {field.name: field.default for field in fields(MoeConfigFields)}
    for option, field in (
        ("--capacity-scope", "capacity_scope"),
        ("--drop-policy", "drop_policy"),
        ("--aux-loss-type", "aux_loss_type"),
        ("--aux-loss-scope", "aux_loss_scope"),
        ("--router-bias-update-rate", "router_bias_update_rate"),
        ("--z-loss-coef", "router_z_loss_coef"),
    ):
        after = text.split(option, 2)[-1]  # the option's line in the help body, after the usage line
        assert f"(default: {config_defaults[field]})" in after.split(" --", 1)[0], option
    # router_aux_loss_coef=None: each router's own default, which the help lists
    after = " ".join(text.split("--aux-loss-coef", 2)[-1].split(" --", 1)[0].split())
    stated = after.split("(default: the router's: ", 1)[1].split(")", 1)[0]  # "0.01 for a, b; 0 for c, d"
    stated_coefs = {
        name.strip(): float(coef)
        for group in stated.split("; ")
        for coef, names in [group.split(" for ")]
        for name in names.split(",")
    }
    assert stated_coefs == {name: entry.router_class.default_aux_loss_coef for name, entry in ROUTERS.items()}
    # the routers --router-bias-update-rate names are the ones that take an expert bias
    after = " ".join(text.split("--router-bias-update-rate", 2)[-1].split(" --", 1)[0].split())
    stated = after.split("for the routers ", 1)[1].split(":", 1)[0]  # "topk, noisy_topk"
    assert set(stated.split(", ")) == {n for n, e in ROUTERS.items() if e.router_class.supports_expert_bias}


def test_the_layer_spec_summary_matches_the_library():
    from hf_moe.cli import LAYER_SPEC_SHORT
    from hf_moe.conversion.layer_selection import LAYER_SPEC_HELP, select_layers

    for form in ("all", "none", "every_other", "top:N", "bottom:N"):
        assert form in LAYER_SPEC_SHORT and form in LAYER_SPEC_HELP
    assert select_layers("0,2", 4) == [0, 2]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip()
