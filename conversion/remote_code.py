"""Generate the flat ``trust_remote_code`` modules of a Hub repo from this package's own sources.

transformers loads remote code from the repo root only. It ships a sibling file only when some module names it in a
line of the form ``from .x import y`` (``from . import x`` is not recognized; no subpackages), and before importing
a file it requires every absolute import outside ``try`` blocks to be installed (on the Hub path, for every shipped
file). The package is a tree (``modeling_deepseek_v32/``, ``configuration/`` and ``kernels/`` mapped as subpackages),
so the Hub files are generated, never maintained by hand. Starting from the configuration and modeling modules:

* ``from .x import a, b`` is resolved to the module that defines each name (re-exports in package ``__init__``
  files are followed), that module is shipped under its last name component, and the line becomes
  ``from .<flat> import a, b``;
* ``from . import sub as alias`` (a module object) ships ``sub`` and becomes two lines: a ``from .sub import
  __name__`` line that makes transformers ship the file, then the original binding;
* a module is shippable only if everything it imports at import time is installed wherever transformers is (the
  standard library, torch, transformers and its dependencies), and never the root ``__init__`` (it registers Auto
  classes globally); the Triton kernel modules are therefore not shipped;
* an import that cannot be shipped fails the generation if it runs at import time. Inside a function it is replaced:
  in the kernel dispatcher by ``return None`` (its hooks' contract: None means "run the PyTorch twin", so remote code
  always takes the PyTorch paths), elsewhere by an ``ImportError`` raised when called (e.g. ``from_preset``, whose
  JSON presets are package data). In a module-level ``try`` it becomes that ``ImportError``.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AUTO_MAP", "RemoteCodeError", "generate_remote_code", "write_remote_code"]

PACKAGE = "modeling_deepseek_v32"
KERNELS = f"{PACKAGE}.kernels"
ENTRY_MODULES = (f"{PACKAGE}.configuration.configuration_deepseek_v32", f"{PACKAGE}.modeling_deepseek_v32")
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek_v32.DeepseekV32Config",
    "AutoModel": "modeling_deepseek_v32.DeepseekV32Model",
    "AutoModelForCausalLM": "modeling_deepseek_v32.DeepseekV32ForCausalLM",
}
# Importable wherever transformers itself is (transformers' own hard dependencies included).
_AVAILABLE = {"torch", "transformers", "huggingface_hub", "safetensors", "tokenizers", "numpy", "tqdm", "packaging", "yaml", "regex"}
_INSTALL_HINT = "is not available in the Hub remote code; pip install the deepseek-v32 package for it"


class RemoteCodeError(RuntimeError):
    """The package's sources cannot be flattened into working remote code; the message names file and line."""


@dataclass(frozen=True)
class _Module:
    name: str  # dotted import name
    path: Path
    is_package: bool


def _find(name: str) -> _Module | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return _Module(name, Path(spec.origin), spec.submodule_search_locations is not None)


def _import_time_requirements(path: Path) -> set[str]:
    """Top-level packages a file needs at import time, as transformers' ``check_imports`` computes them."""
    from transformers.dynamic_module_utils import get_imports

    return set(get_imports(path))


def _contexts(tree: ast.AST) -> dict[int, str]:
    """``id(node)`` of each relative import -> ``"top"``, ``"try"`` (module-level try) or ``"function"``."""
    where: dict[int, str] = {}

    def visit(node: ast.AST, context: str) -> None:
        for child in ast.iter_child_nodes(node):
            ctx = context
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                ctx = "function"
            elif isinstance(child, ast.Try) and context == "top":
                ctx = "try"
            if isinstance(child, ast.ImportFrom) and child.level > 0:
                where[id(child)] = ctx
            visit(child, ctx)

    visit(tree, "top")
    return where


class _Flattener:
    def __init__(self) -> None:
        self.shipped: dict[str, _Module] = {}  # flat name -> module
        self.sources: dict[str, str] = {}  # flat name -> rewritten source

    # -- what can be shipped -------------------------------------------------------------------------------------
    def _shippable(self, module: _Module) -> bool:
        if module.name == PACKAGE:
            return False
        stdlib = set(sys.stdlib_module_names)
        return _import_time_requirements(module.path) <= stdlib | _AVAILABLE

    def _defining_module(self, package: _Module, name: str) -> _Module | None:
        """The plain module that really defines ``name`` imported from ``package`` (following re-exports)."""
        tree = ast.parse(package.path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        target = _find(f"{package.name}.{node.module}")
                        if target is not None and target.is_package:
                            return self._defining_module(target, alias.name)
                        return target
        return None  # defined in the __init__ itself: shipping that __init__ is not supported

    def _plan(self, module: _Module, node: ast.ImportFrom) -> list[tuple[str, _Module, list[ast.alias]]] | None:
        """``[(kind, module to ship, aliases)]`` for one relative import, kind ``"names"`` or ``"module"``;
        ``None`` when some part of it cannot be shipped."""
        parts = module.name.split(".")
        package_parts = parts if module.is_package else parts[:-1]
        if node.level > len(package_parts):
            return None
        base = ".".join(package_parts[: len(package_parts) - (node.level - 1)] + ([node.module] if node.module else []))
        target = _find(base)
        if target is None:
            return None
        plan: list[tuple[str, _Module, list[ast.alias]]] = []
        for alias in node.names:
            if alias.name == "*":
                return None
            if not target.is_package:
                item = ("names", target)
            else:
                submodule = _find(f"{target.name}.{alias.name}")
                if submodule is not None:
                    item = ("module", submodule)
                else:
                    defining = self._defining_module(target, alias.name)
                    if defining is None:
                        return None
                    item = ("names", defining)
            if not item[1].name.startswith(PACKAGE + ".") or not self._shippable(item[1]):
                return None
            for kind, shipped, aliases in plan:
                if kind == item[0] == "names" and shipped == item[1]:
                    aliases.append(alias)
                    break
            else:
                plan.append((item[0], item[1], [alias]))
        return plan

    # -- rewriting -----------------------------------------------------------------------------------------------
    def add(self, module: _Module) -> str:
        flat = module.name.rsplit(".", 1)[-1]
        if flat in self.shipped:
            if self.shipped[flat] != module:
                raise RemoteCodeError(f"two modules would both be shipped as {flat}.py: {self.shipped[flat].name} and {module.name}")
            return flat
        self.shipped[flat] = module
        self.sources[flat] = self._rewrite(module)
        return flat

    def _fallback(self, module: _Module, node: ast.ImportFrom, context: str, indent: str) -> str:
        statement = ast.unparse(node)
        if context == "top":
            raise RemoteCodeError(
                f"{module.path}:{node.lineno}: `{statement}` runs at import time but cannot be shipped as flat remote "
                "code (a name defined in a package __init__, a module needing packages transformers does not bring, "
                "or a star import)"
            )
        if context == "function" and (module.name == KERNELS or module.name.startswith(KERNELS + ".")):
            return f"{indent}return None  # remote code: `{statement}` is not shipped; None selects the PyTorch path\n"
        message = f"`{statement}` {_INSTALL_HINT}"
        return f"{indent}raise ImportError({message!r})\n"

    def _rewrite(self, module: _Module) -> str:
        text = module.path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        lines = text.splitlines(keepends=True)
        contexts = _contexts(tree)
        edits: list[tuple[int, int, list[str]]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names) or (
                isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE
            ):
                raise RemoteCodeError(f"{module.path}:{node.lineno}: an absolute import of {PACKAGE} cannot work where the package is not installed")
            if not (isinstance(node, ast.ImportFrom) and node.level > 0):
                continue
            first, last = node.lineno - 1, node.end_lineno - 1
            indent = lines[first][: node.col_offset]
            rest = lines[last][node.end_col_offset :].strip()
            if indent.strip() or (rest and not rest.startswith("#")):
                raise RemoteCodeError(f"{module.path}:{node.lineno}: a relative import must stand alone on its line(s)")
            plan = self._plan(module, node)
            if plan is None:
                edits.append((first, last, [self._fallback(module, node, contexts.get(id(node), "top"), indent)]))
                continue
            new_lines = []
            for kind, target, aliases in plan:
                flat = self.add(target)
                if kind == "names":
                    names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in aliases)
                    new_lines.append(f"{indent}from .{flat} import {names}\n")
                else:
                    (alias,) = aliases
                    # transformers ships a sibling file only when a `from .x import` line names it.
                    new_lines.append(f"{indent}from .{flat} import __name__ as _{flat}_module_name  # noqa: F401\n")
                    new_lines.append(f"{indent}from . import {flat} as {alias.asname or alias.name}\n")
            edits.append((first, last, new_lines))
        for first, last, new_lines in sorted(edits, reverse=True):
            lines[first : last + 1] = new_lines
        return "".join(lines)


def generate_remote_code() -> dict[str, str]:
    """``{file name: source}`` of the flat remote-code modules, generated from the installed package."""
    from modeling_deepseek_v32 import __version__

    flattener = _Flattener()
    for entry in ENTRY_MODULES:
        module = _find(entry)
        if module is None:
            raise RemoteCodeError(f"cannot find the package module {entry}")
        flattener.add(module)
    files = {}
    for flat, module in flattener.shipped.items():
        relative = module.name.replace(".", "/") + (" (package __init__)" if module.is_package else ".py")
        banner = (
            f"# Generated by hub_upload.py from {relative} of the deepseek-v32 package, version {__version__}.\n"
            "# Flat remote code for `trust_remote_code=True`; edit the package, not this file.\n"
        )
        files[f"{flat}.py"] = banner + flattener.sources[flat]
    return files


def write_remote_code(folder: str | Path) -> list[str]:
    """Write the remote-code modules into ``folder``; check them with transformers' own import rules.

    Returns the file names written. Raises :class:`RemoteCodeError` if transformers would not ship a needed file,
    and ``ImportError`` if a shipped file needs a package this host lacks.
    """
    from transformers.dynamic_module_utils import check_imports, get_relative_import_files

    folder = Path(folder)
    files = generate_remote_code()
    for name, source in files.items():
        (folder / name).write_text(source, encoding="utf-8")
    reachable = set()
    for entry in sorted({ref.split(".")[0] for ref in AUTO_MAP.values()}):
        path = folder / f"{entry}.py"
        reachable.add(path.name)
        for needed in get_relative_import_files(path):
            if not Path(needed).exists():
                raise RemoteCodeError(f"{path.name}: imports {Path(needed).name}, which was not generated")
            reachable.add(Path(needed).name)
    for name in files:
        if name not in reachable:
            raise RemoteCodeError(f"{name} was generated but transformers would not ship it (no `from .x import` line names it)")
        check_imports(folder / name)  # transformers runs this on every Hub file before importing it
    return sorted(files)
