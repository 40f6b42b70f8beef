"""script_settings.py: flags from a constants block, and --help that shows each constant's comment and default."""

import subprocess
import sys
from pathlib import Path

import script_settings

ROOT = Path(__file__).resolve().parents[1]
SOURCE = '''"""A script."""
# -----------------------------------------------------------------------------
# Model: what is trained
MODEL_ID = "tiny"  # which model
STEPS = 3  # optimiser steps; a long comment
#            that goes on below
# Optimisation
RATE = dict(
    a=1,
)  # learning rate
NO_COMMENT = 2
# -----------------------------------------------------------------------------
'''


def test_comments_and_sections_are_read_from_the_constants_block():
    comments, sections = script_settings.read_constant_comments(SOURCE)
    assert comments == {"MODEL_ID": "which model", "STEPS": "optimiser steps; a long comment that goes on below",
                        "RATE": "learning rate"}
    assert sections["MODEL_ID"] == sections["STEPS"] == ("Model", "what is trained")
    assert sections["RATE"] == sections["NO_COMMENT"] == ("Optimisation", "")


def test_train_help_shows_the_description_and_each_flags_comment_and_default():
    result = subprocess.run([sys.executable, str(ROOT / "train_grpo.py"), "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "Fine-tune gpt-oss with GRPO and LoRA" in text and "python train_grpo.py --resume" in text
    assert "--total-steps TOTAL_STEPS optimiser steps (default: 200; --tiny: 800)" in text
    assert "--learning-rate LEARNING_RATE AdamW peak learning rate of the LoRA weights (default: 1e-05; --tiny: 0.002)" in text
    assert "~30% slower (default: true; --tiny: false)" in text  # a % in a comment does not break argparse
    assert "Optimisation:" in result.stdout and "LoRA:" in result.stdout  # grouped by the block's section headers


def test_every_script_built_from_constants_gets_comments_in_its_help(capsys):
    import pytest

    import export_quantized_model

    with pytest.raises(SystemExit):
        export_quantized_model.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite true|false replace an existing export in EXPORT_DIR (default: false)" in text


def test_each_scripts_settings_are_the_constants_it_assigns_itself():
    """SETTINGS (the flags and run_config.json) are the upper-case names a script assigns at its top level: a constant
    it imports (a library's INTEGRATION_TO_CALLBACK, say) would become a flag and a setting that cannot be written."""
    import ast
    import importlib

    for name in ("train_grpo", "export_quantized_model", "run_exported_model", "test_lora_adapter",
                 "test_lora_adapter_quantized"):
        module = importlib.import_module(name)
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        assigned = {target.id for node in tree.body if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name) and target.id.isupper()}
        assert set(module.SETTINGS) <= assigned, (name, set(module.SETTINGS) - assigned)
