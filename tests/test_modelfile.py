"""Tests for the Ollama Modelfile: only Ollama instructions, FROM = the exporter's default output, training's prompt."""

import re
from pathlib import Path

import pytest

import export_quantized_model
import harmony

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
# Ollama's documented PARAMETER names (docs/modelfile.md)
PARAMETERS = {"num_ctx", "repeat_last_n", "repeat_penalty", "temperature", "seed", "stop", "num_predict", "top_k",
              "top_p", "min_p"}


def parse_modelfile(text):
    """[(INSTRUCTION, argument)]: '#' comment lines and blank lines skipped, triple-quoted arguments may span lines."""
    entries, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        match = re.match(r"(\S+)\s+(.*)$", line)
        assert match, f"Modelfile line {i} is not 'INSTRUCTION argument': {line!r}"
        instruction, argument = match[1].upper(), match[2]
        if argument.startswith('"""'):
            body = argument[3:]
            while not body.endswith('"""'):
                assert i < len(lines), "unterminated triple-quoted argument"
                body += "\n" + lines[i]
                i += 1
            argument = body[:-3]
        entries.append((instruction, argument))
    return entries


@pytest.fixture(scope="module")
def entries():
    return parse_modelfile((ROOT / "Modelfile").read_text())


def test_modelfile_uses_only_ollama_instructions(entries):
    assert {instruction for instruction, _ in entries} <= INSTRUCTIONS


def test_modelfile_has_exactly_one_from(entries):
    assert [instruction for instruction, _ in entries].count("FROM") == 1


def test_modelfile_from_is_the_exporters_default_output(entries):
    source = next(argument for instruction, argument in entries if instruction == "FROM")
    assert (ROOT / source).resolve() == (ROOT / export_quantized_model.EXPORT_DIR).resolve()


def test_modelfile_parameters_are_known_with_gpt_oss_sampling(entries):
    parameters = dict(argument.split(maxsplit=1) for instruction, argument in entries if instruction == "PARAMETER")
    assert parameters.keys() <= PARAMETERS
    assert float(parameters["temperature"]) == 1.0 and float(parameters["top_p"]) == 1.0


def test_modelfile_system_prompt_is_the_training_instruction(entries):
    system = [argument for instruction, argument in entries if instruction == "SYSTEM"]
    assert system == [harmony.DEVELOPER_INSTRUCTIONS]


def test_modelfile_leaves_the_template_to_ollamas_harmony_renderer(entries):
    assert "TEMPLATE" not in {instruction for instruction, _ in entries}
