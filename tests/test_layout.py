"""The repository's layout as a newcomer meets it: the scripts (and a few helpers) at the root, the GPU engine, the
training run's parts and the adapter tools in their packages, imports flowing one way, no file too long to read, and
every private name of TRL / transformers / PEFT in the file that library_internals names as its owner."""

import ast
import subprocess
import sys
from pathlib import Path

import library_internals

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gpu_engine", "training", "adapters")
MAX_ROOT_MODULES = 15
MAX_LINES = 800
LIBRARIES = ("trl", "transformers", "peft")


def project_files():
    files = sorted(ROOT.glob("*.py")) + [p for package in PACKAGES for p in sorted((ROOT / package).glob("*.py"))]
    return files + sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "tests").glob("*.py"))


def module_name(path):
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imported_project_modules(path, modules):
    """Project modules `path` imports anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in modules}
    return found


def test_the_root_holds_the_scripts_and_at_most_a_few_helpers():
    root_modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root_modules) <= MAX_ROOT_MODULES, root_modules
    for package in PACKAGES:
        assert (ROOT / package / "README.md").is_file(), f"{package}/ has no README.md saying what its parts are"


def test_no_file_is_longer_than_a_reader_can_hold():
    long = {str(p.relative_to(ROOT)): n for p in project_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_imports_flow_one_way():
    files = [p for p in project_files() if p.parent.name not in ("tests", "benchmarks")]
    modules = {module_name(p): p for p in files}
    graph = {name: imported_project_modules(path, modules) - {name} for name, path in modules.items()}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    # and between the packages, one way: adapters/ -> training/ -> gpu_engine/, never back
    below = {"gpu_engine": ("training", "adapters"), "training": ("adapters",)}
    upward = [f"{name} imports {other}" for name, others in graph.items() for other in others
              if any(name.startswith(package + ".") and other.startswith(tuple(p + "." for p in above))
                     for package, above in below.items())]
    assert not upward, upward


def private_library_names(tree):
    """`_name`s that a module's `tree` reads, calls or overrides: attributes, names imported with a leading
    underscore, getattr / hasattr / setattr strings, and methods of its classes that subclass another class (an
    override of a private method). Which of them are the project's own is decided across the whole project."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            used |= {alias.name for alias in node.names if alias.name.startswith("_")}
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and str(node.args[1].value).startswith("_") and not str(node.args[1].value).startswith("__")):
            used.add(node.args[1].value)
        elif isinstance(node, ast.ClassDef) and node.bases:
            used |= {item.name for item in node.body if isinstance(item, ast.FunctionDef)
                     and item.name.startswith("_") and not item.name.startswith("__")}
    return used


def listed_names(internals):
    names = set()
    for _, dotted, expected in internals:
        parts = dotted.split(".") if dotted else [expected]
        names |= {part for part in parts if part.startswith("_")}
    return names


def test_every_private_library_name_is_listed_and_used_only_by_its_owner():
    """A `_name` that none of the project's own code defines comes from a library: it must be in the entries of
    the file's own group in library_internals.OWNERS (checked at start-up), and a file with no group uses none.
    (torch's `_version` counter is torch's public way to see in-place writes, not a TRL / transformers / PEFT
    internal.)"""
    trees = {path: ast.parse(path.read_text()) for path in project_files()}
    classes = {node.name for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    project_own, overrides = set(), set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                library_bases = [b for b in node.bases if getattr(b, "id", getattr(b, "attr", None)) not in classes]
                methods = {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
                (overrides if library_bases else project_own).update(methods)
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                project_own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                project_own.add(node.attr)
    project_own -= overrides
    listed = listed_names([entry for group in library_internals.OWNERS.values() for entry in group])
    problems = []
    for path in project_files():
        if path.parent.name in ("tests", "benchmarks"):
            continue
        relative = str(path.relative_to(ROOT))
        allowed = listed_names(library_internals.OWNERS.get(relative, ()))
        for name in sorted(private_library_names(trees[path]) - {"_version"}):
            if name in allowed:
                continue
            if name in project_own and name not in listed:
                continue
            problems.append(f"{relative}: {name}")
    assert not problems, ("private library names outside their owner's entries in library_internals.OWNERS: "
                          + ", ".join(problems))


def test_the_owners_named_in_library_internals_exist_and_their_entries_are_checked():
    for relative, internals in library_internals.OWNERS.items():
        assert (ROOT / relative).is_file(), relative
        library_internals.check(internals)


def test_nothing_is_hidden_on_a_model_object():
    hidden = [str(p.relative_to(ROOT)) for p in project_files()
              if p.parent.name != "tests" and "object.__setattr__(" in p.read_text()]
    assert not hidden, f"object.__setattr__ in {hidden}: keep such state on an object the caller holds"


def test_every_script_and_package_imports_without_triton():
    """triton is a GPU extra (requirements-gpu.txt): the Triton kernels are imported where they launch, so that a
    CPU install of requirements.txt runs every script."""
    code = """
import sys
sys.modules["triton"] = None  # as if it were not installed: find_spec says so, and importing it fails
import train_grpo, model_loader, export_quantized_model, run_exported_model, test_lora_adapter_quantized
from gpu_engine import decode_step, expert_lora, mxfp4_experts, rollout_engine, sink_attention
from training import evaluation, generation, grpo_trainer
from adapters import adapter_evaluation, adapter_merge
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
