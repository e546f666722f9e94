"""The shape of the code, checked: data flows one way between stages, no import cycles, no generic top-level
package names, and shipped files are found by any installed copy.

    edgellm/ (contracts)  <-  train  <-  convert  <-  bench
                                                  <-  serve   (imports no other stage)

Read from the source with ``ast``: every import counts, including those inside functions (a lazy import is still
a dependency, and hiding one inside a function is how cycles used to survive).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train", "convert", "serve", "bench")

# What each part may import from edgellm (besides itself and the contracts in edgellm/).
ALLOWED: dict[str, tuple[str, ...]] = {
    "core": (),
    "train": (),
    "convert": ("edgellm.train",),
    # bench drives the serving engine only through its public package API (`edgellm.serve.engine`), never through
    # engine internals; it may read what train and convert produce.
    "bench": ("edgellm.train", "edgellm.convert"),
    "serve": (),
}
BENCH_MAY_USE_EXACTLY = ("edgellm.serve.engine",)
# The console script is the one place that sees every stage (it registers their subcommands).
CLI_MODULES = ("edgellm.cli", "edgellm.__main__")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in STAGES:
        parts.insert(0, "edgellm")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    files = sorted((REPO / "edgellm").glob("*.py"))
    for stage in STAGES:
        files += sorted((REPO / stage).rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (absolute names; relative imports resolved), with line numbers."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((node.lineno, base))
            # `from edgellm.serve import engine` imports the submodule edgellm.serve.engine
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if _is_module(f"{base}.{alias.name}")]
    return out


def _is_module(name: str) -> bool:
    return name in MODULES


MODULES = {module_name(f): f for f in source_files()}


def part_of(module: str) -> str:
    for stage in STAGES:
        if module == f"edgellm.{stage}" or module.startswith(f"edgellm.{stage}."):
            return stage
    return "core"


def test_every_source_file_is_seen() -> None:
    assert "edgellm.serve.app" in MODULES and "edgellm.train.qlora" in MODULES and "edgellm.paths" in MODULES
    assert len(MODULES) > 50


def test_no_generic_top_level_imports() -> None:
    """Stages import as edgellm.<stage>; `import serve` would find an unrelated package in a user's environment."""
    bad = [
        f"{path.relative_to(REPO)}:{line}: imports {name}"
        for path in [*source_files(), *sorted((REPO / "tests").glob("*.py"))]
        for line, name in imports_of(path)
        if name.split(".")[0] in STAGES
    ]
    assert not bad, "\n".join(bad)


def test_data_flows_one_way() -> None:
    bad = []
    for module, path in MODULES.items():
        if module in CLI_MODULES:
            continue
        part = part_of(module)
        for line, name in imports_of(path):
            if not name.startswith("edgellm."):
                continue
            where = f"{path.relative_to(REPO)}:{line}"
            if name in CLI_MODULES:
                bad.append(f"{where}: {module} imports the CLI ({name})")
                continue
            target = part_of(name)
            if target in (part, "core"):
                continue
            allowed = any(name == a or name.startswith(a + ".") for a in ALLOWED[part])
            if part == "bench" and name in BENCH_MAY_USE_EXACTLY:
                allowed = True
            if not allowed:
                bad.append(f"{where}: {part} must not import {target} ({name})")
    assert not bad, "imports against the flow edgellm/ <- train <- convert <- bench/serve:\n" + "\n".join(bad)


def test_serve_error_path_imports_no_catalog() -> None:
    """The server's error module and the shared errors pull in nothing heavy (no catalog, no tqdm, no pydantic)."""
    for line, name in imports_of(REPO / "edgellm" / "errors.py"):
        assert name in ("__future__",), f"edgellm/errors.py:{line} imports {name}"


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for _, name in imports_of(path):
            # importing a.b.c also runs a and a.b: depend on the deepest known module of the name
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                graph[module].add(name)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_library_code_does_not_print() -> None:
    """Logging, not print, in library code; only the CLI modules and a script's ``main()`` print."""
    bad = []
    for module, path in MODULES.items():
        if module.endswith(".cli") or module in CLI_MODULES or module.endswith("__main__"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        script_mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        allowed = {id(c) for m in script_mains for c in ast.walk(m)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                if id(node) not in allowed:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}: print() in library code")
    assert not bad, "\n".join(bad)


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-editable install of edgellm (the wheel unpacked into a folder of its own, without dependencies)."""
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("edgellm-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def test_wheel_claims_only_the_edgellm_name(installed_wheel: Path) -> None:
    top = {p.name for p in installed_wheel.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"edgellm"}, f"the wheel installs top-level names {sorted(top)}"
    for stage in STAGES:
        assert (installed_wheel / "edgellm" / stage / "__init__.py").is_file()


def test_installed_copy_finds_its_configs_and_data(installed_wheel: Path, tmp_path: Path) -> None:
    """Run from an empty folder with only the installed wheel on the path: the shipped configs, the catalog and
    the demo data are found inside the package, and the serve config validates."""
    site = str(installed_wheel)
    code = (
        "import edgellm, edgellm.paths as p, edgellm.catalog as c\n"
        "from edgellm.serve.settings import load_serve_settings\n"
        f"assert edgellm.__file__.startswith({site!r}), edgellm.__file__\n"
        "for rel in ('configs/serve.yaml', 'configs/train/demo.yaml', 'models/catalog.yaml',\n"
        "            'train/data/hammy.jsonl', 'train/reranker_data/stdlib_docstrings.jsonl', 'bench/data/heldout.txt'):\n"
        "    f = p.resolve_input(rel)\n"
        f"    assert f.is_file() and str(f).startswith({site!r}), (rel, f)\n"
        "assert 'default' in c.load_catalog()\n"
        "s = load_serve_settings(p.shipped('configs/serve.yaml'), {})\n"
        "print(s.models[0].name)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path[:0] = [{str(installed_wheel)!r}]\n{code}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
