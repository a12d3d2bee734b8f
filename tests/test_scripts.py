"""Every command-line script in one shape (parse_args(argv=None) -> args, main(args), exit_on_usage_error under
__main__); each script's --vae_mode accepts exactly its part of partitioned_vae.VAE_MODES; each trainer sets every
flag default the shared declarations leave to it."""
import argparse
import ast
import contextlib
import importlib
import io
import re
from pathlib import Path
from unittest import mock

import pytest

import accelerated
import eval_vae
import export
import generate_and_eval_fid
import test_flux
import test_sd3
import train_sc_vae
import train_sd3
from partitioned_vae import VAE_MODES

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path for path in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py")]
                 if 'if __name__ == "__main__":' in path.read_text())


def test_the_scripts_are_found():
    names = {path.name for path in SCRIPTS}
    assert {"train_sd3.py", "train_sc_vae.py", "test_sd3.py", "eval.py", "eval_vae.py", "demo.py",
            "generate_and_eval_fid.py", "gpu_sweep.py"} <= names and len(names) >= 20


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_script_has_parse_args_main_and_one_usage_error_exit(path):
    tree = ast.parse(path.read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "main" in functions and [a.arg for a in functions["main"].args.args] == ["args"]
    parse_args = functions.get("parse_args")
    assert parse_args is not None and [a.arg for a in parse_args.args.args] == ["argv"]
    assert isinstance(parse_args.args.defaults[0], ast.Constant) and parse_args.args.defaults[0].value is None
    [guard] = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    [statement] = guard.body
    prog = path.name if path.parent == ROOT else f"python -m bench.{path.stem}"
    assert ast.unparse(statement) == f"exit_on_usage_error({prog!r}, main, parse_args())"


def test_parse_args_returns_the_flags_alone():
    args = generate_and_eval_fid.parse_args(["--json_file", "m.jsonl", "--save_path", "out"])
    assert args.json_file == "m.jsonl" and args.num_inference_steps == 28  # the paper's SD3 setting filled in


def accepts(parse, mode):
    """Whether a script's flags take --vae_mode `mode`."""
    try:
        parse(mode)
    except SystemExit:
        return False
    return True


GENERATED = {"f8", "full", "partitioned", "subpixel", "authors"}  # f8_half shrinks an image: eval_vae.py only
F16 = {"full", "partitioned", "subpixel", "authors"}


@pytest.mark.parametrize("script, takes, modes", [
    (lambda m: test_sd3.parse_args(["--vae_mode", m]), lambda mode: mode.generates, GENERATED),
    (lambda m: test_flux.parse_args(["--vae_mode", m]), lambda mode: mode.generates, GENERATED),
    (lambda m: generate_and_eval_fid.parse_args(["--json_file", "j", "--save_path", "s", "--vae_mode", m]),
     lambda mode: mode.generates, GENERATED),
    (lambda m: eval_vae.parse_args(["--vae", "v", "--data_dir", "d", "--output_json", "o", "--vae_mode", m]),
     lambda mode: True, GENERATED | {"f8_half"}),
    (lambda m: train_sc_vae.parse_args(["--pretrained_model_name_or_path", "p", "--train_data_dir", "d",
                                        "--vae_mode", m]), lambda mode: mode.f16, F16),
    (lambda m: export.parse_args(["--format", "vae", "--out", "o.safetensors", "--vae_mode", m]),
     lambda mode: mode.f16, F16),
], ids=["test_sd3", "test_flux", "generate_and_eval_fid", "eval_vae", "train_sc_vae", "export"])
def test_each_vae_mode_flag_takes_its_part_of_the_one_table(script, takes, modes, capsys):
    assert {name for name, mode in VAE_MODES.items() if takes(mode)} == modes  # the table says which script takes it
    assert {name for name in [*VAE_MODES, "f16"] if accepts(script, name)} == modes
    capsys.readouterr()


# The shared run flags whose defaults differ: each trainer's own (the paper's, the authors' SC-VAE launch script).
TRAINER_DEFAULTS = {
    "train_sd3": dict(train_batch_size=8, gradient_accumulation_steps=1, gradient_checkpointing=True,
                      max_train_steps=20000, learning_rate=1e-6, mixed_precision=None, num_validation_images=1,
                      checkpointing_steps=5000),
    "train_sc_vae": dict(train_batch_size=32, gradient_accumulation_steps=2, gradient_checkpointing=False,
                         max_train_steps=None, learning_rate=1e-5, mixed_precision="no", num_validation_images=4,
                         checkpointing_steps=10000),
}


@pytest.mark.parametrize("trainer, argv", [
    (train_sd3, ["--pretrained_model_name_or_path", "p", "--instance_data_dir", "d"]),
    (train_sc_vae, ["--pretrained_model_name_or_path", "p", "--train_data_dir", "d"]),
], ids=["train_sd3", "train_sc_vae"])
def test_each_trainer_sets_the_defaults_the_shared_flags_leave_to_it(trainer, argv):
    args = vars(trainer.parse_args(argv))
    expected = TRAINER_DEFAULTS[trainer.__name__]
    assert {flag: args[flag] for flag in expected} == expected
    assert set(expected) == set(accelerated.TRAINER_DEFAULTS) | {"checkpointing_steps"}


#################################################################################
#                      --help: every flag says its default                      #
#################################################################################

HELP_SCRIPTS = sorted(path for path in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py")]
                      if "\ndef parse_args(argv=None):" in path.read_text())


def help_pages(parse_args, prefix=()):
    """{command words: (parser, help text)} of a script's parse_args, sub-commands included: each page as `--help`
    prints it, with the parser that printed it (caught in argparse's help action)."""
    shown = []
    original = argparse._HelpAction.__call__

    def record(self, parser, namespace, values, option_string=None):
        shown.append(parser)
        original(self, parser, namespace, values, option_string)

    output = io.StringIO()
    with mock.patch.object(argparse._HelpAction, "__call__", record), contextlib.redirect_stdout(output):
        with pytest.raises(SystemExit) as stop:
            parse_args([*prefix, "--help"])
    assert stop.value.code == 0 and len(shown) == 1
    [parser] = shown
    pages = {prefix: (parser, output.getvalue())}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices:
                pages.update(help_pages(parse_args, (*prefix, command)))
    return pages


def flag_entries(text):
    """{option string: its entry} of a --help page: an entry starts on a line indented by two spaces and a dash and
    runs to the next such line or section."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line
            for option in re.findall(r"(?:^|, )(--?[\w-]+)", line.strip()):
                entries[option] = current
        elif line.startswith("    ") and current is not None:
            for option, entry in list(entries.items()):
                if entry is current:
                    entries[option] = entry + "\n" + line
            current = entries[option]
        else:
            current = None
    return entries


def test_the_help_pages_are_found():
    names = {path.name for path in HELP_SCRIPTS}
    assert {"train_sd3.py", "test_sd3.py", "prepare_data.py", "demo.py", "compare.py", "bench_glcm.py",
            "gpu_sweep.py"} <= names and len(names) >= 20


@pytest.mark.parametrize("path", HELP_SCRIPTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_flag_of_every_script_shows_its_default_in_help(path):
    module = importlib.import_module(path.stem if path.parent == ROOT else f"bench.{path.stem}")
    for command, (parser, text) in help_pages(module.parse_args).items():
        entries = flag_entries(text)
        for action in parser._actions:
            if (not action.option_strings or isinstance(action, argparse._HelpAction)
                    or action.help == argparse.SUPPRESS):  # a hidden flag a script passes to its own workers
                continue
            entry = entries.get(action.option_strings[-1])
            assert entry is not None, (command, action.option_strings, text)
            if action.required:
                continue
            shown = "default" in entry.lower()
            assert shown, f"{path.name} {' '.join(command)} {action.option_strings[-1]}: no default in\n{entry}"
            if action.help is None or "default" not in action.help.lower():  # shown by the formatter: the value
                assert "".join(f"(default: {action.default})".split()) in "".join(entry.split()), entry  # wrapped anywhere
