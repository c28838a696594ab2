"""Where COMP's code publishes and subscribes to each subject, read from its source (ast).

A call counts when one of its arguments is ``subjects.NAME`` or ``subjects.builder(...)``:
a publish when the called name says so (``publish``, ``_publish``, ``request``, or a
function of the same module that publishes its parameter), a subscription when it is
``subscribe``/``subscriber``/``get_last_msg``.  For a publish, the body's model is
resolved from the expression where the code says it plainly: a constructor call, a local
assigned from one, a parameter's or attribute's annotation, a loop over an annotated
container, or a function's return annotation.  What cannot be resolved that way is
reported as unresolved rather than guessed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUBSCRIBING = {"subscribe", "subscriber", "get_last_msg", "pull_subscribe"}
CONTAINER_METHODS = {"get", "pop", "values", "items", "setdefault"}


@dataclass(frozen=True)
class Site:
    service: str
    path: str
    line: int
    role: str  # "publish" or "consume"
    subject: str  # the name in comp_common.subjects
    models: frozenset[str] | None  # the body's model names; None: not resolved (or not a publish)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def source_files() -> list[tuple[str, Path]]:
    found = [(p.parts[len(ROOT.parts) + 1], p) for p in sorted((ROOT / "services").glob("*/src/**/*.py"))]
    found += [("cli", p) for p in sorted((ROOT / "cli" / "src").glob("**/*.py"))]
    found += [
        ("common", p) for p in sorted((ROOT / "libs" / "common" / "src").glob("**/*.py"))
        if p.name not in ("subjects.py", "catalog.py")
    ]
    return found


def _subject_name(node: ast.expr) -> str | None:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "subjects":
        return target.attr
    return None


def _called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    if isinstance(call.func, ast.Name):
        return call.func.id
    return None


def _annotation_names(annotation: ast.expr | None, known: set[str]) -> set[str]:
    if annotation is None:
        return set()
    names: set[str] = set()
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name) and node.id in known:
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names |= {token for token in _words(node.value) if token in known}
    return names


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c == "_" else " " for c in text).split()


class Module:
    def __init__(self, service: str, path: Path, functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef], known: set[str]):
        self.service, self.path, self.known = service, path, known
        self.tree = ast.parse(path.read_text())
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(self.tree):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent
        # Functions of the whole package by name, for return annotations of imported helpers.
        self.functions = functions

    def enclosing(self, node: ast.AST, kind: type | tuple[type, ...]) -> ast.AST | None:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, kind):
                return node
        return None

    def models_of(self, expr: ast.expr, at: ast.AST, depth: int = 0) -> set[str]:
        """Model names ``expr`` evaluates to (empty: not resolved)."""
        if depth > 6:
            return set()
        known = self.known
        if isinstance(expr, ast.Await):
            return self.models_of(expr.value, at, depth + 1)
        if isinstance(expr, ast.Subscript):
            return self.models_of(expr.value, at, depth + 1)
        if isinstance(expr, ast.Call):
            func = expr.func
            if isinstance(func, ast.Name):
                if func.id in known:
                    return {func.id}
                return self._returns(func.id)
            if isinstance(func, ast.Attribute):
                if func.attr == "model_copy" or func.attr in CONTAINER_METHODS:
                    return self.models_of(func.value, at, depth + 1)
                if isinstance(func.value, ast.Name) and func.value.id == "self":
                    return self._returns(func.attr)
            return set()
        if isinstance(expr, ast.Name):
            return self._name(expr.id, at, depth)
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == "self":
            return self._self_attribute(expr.attr, at)
        return set()

    def _returns(self, function: str) -> set[str]:
        found = self.functions.get(function)
        return _annotation_names(found.returns, self.known) if found is not None else set()

    def _name(self, name: str, at: ast.AST, depth: int) -> set[str]:
        function = self.enclosing(at, (ast.FunctionDef, ast.AsyncFunctionDef))
        scopes = [function] if function is not None else []
        # A nested function's free names come from the function around it.
        while function is not None and (function := self.enclosing(function, (ast.FunctionDef, ast.AsyncFunctionDef))):
            scopes.append(function)
        for scope in scopes:
            found: set[str] = set()
            args = scope.args
            for arg in args.posonlyargs + args.args + args.kwonlyargs:
                if arg.arg == name:
                    found |= _annotation_names(arg.annotation, self.known)
            for node in ast.walk(scope):
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                    found |= _annotation_names(node.annotation, self.known)
                elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                    found |= self.models_of(node.value, node, depth + 1)
                elif isinstance(node, (ast.For, ast.AsyncFor)) and name in _target_names(node.target):
                    found |= self.models_of(node.iter, node, depth + 1)
                elif isinstance(node, ast.NamedExpr) and node.target.id == name:
                    found |= self.models_of(node.value, node, depth + 1)
            if found:
                return found
        return set()

    def _self_attribute(self, attr: str, at: ast.AST) -> set[str]:
        cls = self.enclosing(at, ast.ClassDef)
        if cls is None:
            return set()
        found: set[str] = set()
        for node in ast.walk(cls):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Attribute)
                and isinstance(node.target.value, ast.Name)
                and node.target.value.id == "self"
                and node.target.attr == attr
            ) or (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == attr):
                found |= _annotation_names(node.annotation, self.known)
        return found

    def subjects_of(self, expr: ast.expr, at: ast.AST) -> list[str]:
        """The ``subjects`` names ``expr`` is: directly, through a local assigned from one,
        or through a loop over a module-level dict, list or tuple of them."""
        direct = _subject_name(expr)
        if direct is not None:
            return [direct]
        if not isinstance(expr, ast.Name):
            return []
        function = self.enclosing(at, (ast.FunctionDef, ast.AsyncFunctionDef))
        if function is None:
            return []
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == expr.id for t in node.targets):
                named = _subject_name(node.value)
                return [named] if named else []
            if isinstance(node, (ast.For, ast.AsyncFor)) and expr.id in _target_names(node.target):
                return self._literal_subjects(node.iter)
        return []

    def _literal_subjects(self, iterated: ast.expr) -> list[str]:
        if isinstance(iterated, ast.Call) and isinstance(iterated.func, ast.Attribute):
            iterated = iterated.func.value  # X.items(), X.values()
        if not isinstance(iterated, ast.Name):
            return []
        for node in self.tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == iterated.id for t in node.targets):
                values = node.value.values if isinstance(node.value, ast.Dict) else getattr(node.value, "elts", [])
                return [n for v in values if (n := _subject_name(v)) is not None]
        return []

    def publishing_parameters(self) -> dict[str, set[int]]:
        """Functions of this module that publish on one of their parameters: name -> the
        positions of those parameters."""
        out: dict[str, set[int]] = {}
        for function in ast.walk(self.tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            names = [a.arg for a in function.args.posonlyargs + function.args.args]
            for call in ast.walk(function):
                if isinstance(call, ast.Call) and _is_publish(_called_name(call)):
                    for arg in call.args:
                        if isinstance(arg, ast.Name) and arg.id in names:
                            out.setdefault(function.name, set()).add(names.index(arg.id))
        return out


def _target_names(target: ast.expr) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def _is_publish(called: str | None) -> bool:
    return called is not None and ("publish" in called or called == "request")


def scan(known_models: set[str], files: list[tuple[str, Path]] | None = None) -> list[Site]:
    """Every publish and subscription on a ``subjects`` name in ``files`` (service, path):
    by default COMP's services, cli and common."""
    files = source_files() if files is None else files
    modules = []
    functions: dict[str, dict[str, ast.FunctionDef | ast.AsyncFunctionDef]] = {}
    for service, path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.setdefault(service, {}).setdefault(node.name, node)
    for service, path in files:
        modules.append(Module(service, path, functions.get(service, {}), known_models))
    sites: list[Site] = []
    for module in modules:
        helpers = module.publishing_parameters()
        relative = str(module.path.relative_to(ROOT)) if module.path.is_relative_to(ROOT) else str(module.path)
        for call in ast.walk(module.tree):
            if not isinstance(call, ast.Call):
                continue
            called = _called_name(call)
            arguments = list(call.args) + [k.value for k in call.keywords]
            named = [(i, n) for i, a in enumerate(arguments) for n in module.subjects_of(a, call)]
            if not named:
                continue
            if called in SUBSCRIBING:
                role = "consume"
            elif _is_publish(called) or (called in helpers and any(i in helpers[called] for i, _ in named)):
                role = "publish"
            else:
                continue
            for position, subject in named:
                models: frozenset[str] | None = None
                if role == "publish" and _is_publish(called):
                    bodies = [a for i, a in enumerate(call.args) if i != position and not module.subjects_of(a, call)]
                    if bodies:
                        resolved = module.models_of(bodies[0], call)
                        models = frozenset(resolved) if resolved else None
                sites.append(Site(module.service, relative, call.lineno, role, subject, models))
    return sites
