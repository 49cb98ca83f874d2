"""The layout figures: how much there is to read, and where the plumbing and `args` go.

    python benchmarks/structure.py [ROOT] [--json FILE]

ROOT is a checkout of this repository (default: the one this script is in), flat layout or
package layout alike. Everything is read with `ast`; nothing is imported or run. The files seen
are the git checkout's tracked and untracked-but-not-ignored files (`git ls-files`), or, outside
git, every file; hidden entries and __pycache__ are never seen.

Kinds of .py file (paths relative to ROOT):
  stage        collect.py, bootstrap.py, consensus.py, apo.py, evaluate.py at the top
  test         test_*.py anywhere, anything under tests/, and the test support conftest.py,
               tiny_models.py, loopback_servers.py, launch_for_tests.py
  benchmark    anything under benchmarks/
  script       anything under scripts/, and study.py, quickstart.py, export_preferences.py,
               export_checkpoint.py, drift_report.py at the top
  shared       every other .py (common/ and apo_loss.py; in the flat layout the other top-level modules)
  product      stage + script + shared (what is measured in 3 and 5)

1. Top level: entries (files and folders) and how many are .py.
2. README.md: bytes and lines.
3. One APO step. The root is the `for step ...` loop of `train` in apo.py; its lines (the `for`
   statement, first to last line) count as one definition. Every call made inside the loop is
   followed, and then every call in the whole body of each function reached, transitively; each
   definition counts once with its lines (decorators to last line). Calls resolve by the rules
   below (R1-R7). Reported: lines, definitions, files.
4. Plumbing share of each stage file: plumbing code lines / code lines. Code lines are lines with
   a Python token other than a comment, minus docstrings. An identifier is plumbing if one of its
   words (split at _ and at camelCase) is in PLUMBING_WORDS or its snake_case form contains one of
   PLUMBING_PHRASES; only identifiers count (names, attributes, keyword names, imported names,
   def and class names), never strings or comments. Then, statement by statement:
     - a def or class whose name is plumbing is plumbing, all of it;
     - a simple statement (an assignment, a call, an import, return, raise ...) naming a plumbing
       identifier is plumbing;
     - `if` / `while` whose condition names one: the header and its body are plumbing (the
       else branch is judged on its own); `for` / `with` whose header names one: the header
       lines only (`with Run(...) as run:` does not make its body plumbing);
     - `except` naming a plumbing exception: the whole handler;
     - anything else is judged by its parts;
     - within a function, a name bound by a plumbing statement (`done = finished_run(...)`,
       `for line in repair_torn_tail(...)`, `with ... as journal`) is plumbing in the statements
       after it, until a statement that is not plumbing binds it again.
   --plumbing-of FILE measures any one file by the same rule (e.g. accelerate's
   examples/complete_nlp_example.py).
5. Structure: product .py files; import arrows (distinct pairs of product modules A != B with A
   importing B: import statements anywhere in A, and lazy_import("B") / import_module("B");
   `from P import m` with m a module is an arrow to P.m, not also to the package P);
   and, per stage, the call graph from the stage's `main` (rules R1-R6): the files entered
   (files holding a reached definition, the stage's own included) and the passes of `args`
   back up into the stage: call sites in a reached function where
     - a function of a shared module calls a function or method defined in a stage file, or
     - a call to a function of a shared module hands it a stage's function (named, e.g.
       `run_stage(train, args)`) or a lambda written in the stage file, which the shared
       module then calls (a callback),
   and `args` (the name, or a call of parse_args) is among that call's arguments or, for a
   lambda, in its body. The same passes without the `args` condition are reported too, and
   the call sites (reached from main) that hand `args` to a function of another file.

Call resolution (static, deterministic; what it cannot see it leaves out):
  R1 f(...) / mod.f(...) / imported f: the function defined in the repository, following
     `from X import f` re-exports; `mod = lazy_import("X")` binds a module like `import X`.
  R2 calling a class: its __init__ (searched in its repository bases), else the class's own
     lines up to its first method. C.apply(...) of a torch.autograd.Function C: its forward
     and its backward (the backward pass runs it).
  R3 a local variable's class, from `v = C(...)`, `with C(...) as v`, or `v = f(...)` / `a, v = f(...)`
     where f returns `C(...)` (or a local of class C) at that position; then v.m(...) is C.m
     and v(...) is C.__call__ (C.forward for a torch nn.Module).
  R4 self.m(...) inside a class: that class's m (or its repository bases').
  R5 a repository function named without being called (a callback handed to a call, a
     dispatch table entry) is reached; a module-level variable whose value names repository
     functions (e.g. LOSSES = {"apo": apo_loss, ...}) reaches them when read.
  R6 obj.m(...) on an object of unknown class: the method m if exactly one repository class
     defines a method of that name (not forward / backward, which torch calls).
  R7 (3 only) the model call: calling a name that none of the above resolves (a parameter such
     as `module(**inputs)`) reaches `forward` of every nn.Module subclass apo.py constructs.
"""

import argparse
import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path

STAGES = ("collect", "bootstrap", "consensus", "apo", "evaluate")
TEST_SUPPORT = {"conftest.py", "tiny_models.py", "loopback_servers.py", "launch_for_tests.py"}
TOP_SCRIPTS = {"study.py", "quickstart.py", "export_preferences.py", "export_checkpoint.py", "drift_report.py"}
PLUMBING_WORDS = ("lock", "locks", "locked", "manifest", "resume", "resumed", "resuming", "finished", "stopped",
                  "stopping", "signal", "signals", "summary", "summaries", "summarize", "atomic", "checkpoint",
                  "checkpoints", "checkpointing", "appender", "torn", "metrics", "claim", "journal", "provenance",
                  "interrupt")
PLUMBING_PHRASES = ("disk_full", "tie_to_run", "check_output_paths", "end_of_step", "save_state", "load_state")


# ---------------------------------------------------------------------------------------------
# Files


def listed_files(root):
    """Paths (relative, posix) of the checkout's files, hidden entries and __pycache__ left out."""
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        in_git = Path(top).resolve() == root.resolve()
    except (OSError, subprocess.CalledProcessError):
        in_git = False
    if in_git:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
        paths = [p for p in out.split("\0") if p and (root / p).exists()]
    else:
        paths = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted({p for p in paths if not any(part.startswith(".") or part == "__pycache__" for part in p.split("/"))})


def kind_of(path):
    parts = path.split("/")
    name = parts[-1]
    if name.startswith("test_") or parts[0] == "tests" or name in TEST_SUPPORT:
        return "test"
    if parts[0] == "benchmarks":
        return "benchmark"
    if len(parts) == 1 and name[:-3] in STAGES:
        return "stage"
    if parts[0] == "scripts" or (len(parts) == 1 and name in TOP_SCRIPTS):
        return "script"
    return "shared"


def module_name(path):
    name = path[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


# ---------------------------------------------------------------------------------------------
# The repository's modules, functions and classes


class Module:
    def __init__(self, root, path):
        self.path, self.name, self.kind = path, module_name(path), kind_of(path)
        self.source = (root / path).read_text(encoding="utf-8")
        self.tree = ast.parse(self.source, filename=path)
        self.defs = {}  # qualified name -> FunctionDef / ClassDef (top-level functions, classes, methods)
        self.consts = {}  # module-level variable -> its value
        self.aliases = {}  # local name -> ("module", M) or ("symbol", M, name)
        self.imported = []  # module names as written, in order
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs[node.name] = node
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self.defs[f"{node.name}.{item.name}"] = item
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.consts[node.targets[0].id] = node.value


class Repo:
    def __init__(self, root):
        self.root = root.resolve()
        self.files = listed_files(self.root)
        self.modules = {}
        for path in self.files:
            if path.endswith(".py") and kind_of(path) not in ("test", "benchmark"):
                module = Module(self.root, path)
                self.modules[module.name] = module
        for module in self.modules.values():
            self.read_imports(module)
        self.methods_by_name = {}
        for module in self.modules.values():
            for qual in module.defs:
                if "." in qual:
                    self.methods_by_name.setdefault(qual.split(".")[1], []).append((module.name, qual))
        self.returns_cache = {}

    def read_imports(self, module):
        def add_module(local, name):
            if name in self.modules:
                module.aliases[local] = ("module", name)

        # The arrow goes to the module named: `import a.b` and `from a import b` (b a module) to a.b,
        # `from a import f` to a; never also to the package a.
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    add_module(a.asname or a.name.split(".")[0], a.name if a.asname else a.name.split(".")[0])
                    module.imported.append(a.name)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in self.modules:
                        add_module(a.asname or a.name, full)
                        module.imported.append(full)
                    else:
                        module.imported.append(node.module)
                        if node.module in self.modules:
                            module.aliases[a.asname or a.name] = ("symbol", node.module, a.name)
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                  and isinstance(node.value, ast.Call) and dotted(node.value.func).split(".")[-1] in
                  ("lazy_import", "import_module") and node.value.args
                  and isinstance(node.value.args[0], ast.Constant) and isinstance(node.value.args[0].value, str)):
                add_module(node.targets[0].id, node.value.args[0].value)
                module.imported.append(node.value.args[0].value)

    # Names ------------------------------------------------------------------------------------

    def symbol(self, modname, name, depth=0):
        """What `name` is in module modname: ("def", (M, qual)), ("module", M), ("const", M, name) or None."""
        module = self.modules.get(modname)
        if module is None or depth > 10:
            return None
        if name in module.defs:
            return ("def", (modname, name))
        alias = module.aliases.get(name)
        if alias and alias[0] == "module":
            return alias
        if alias:
            return self.symbol(alias[1], alias[2], depth + 1)
        if name in module.consts:
            return ("const", modname, name)
        return None

    def expr_symbol(self, modname, node):
        """What a Name or mod.attr expression names in modname."""
        if isinstance(node, ast.Name):
            return self.symbol(modname, node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            base = self.symbol(modname, node.value.id)
            if base and base[0] == "module":
                return self.symbol(base[1], node.attr)
        return None

    def node(self, key):
        return self.modules[key[0]].defs[key[1]]

    def is_class(self, key):
        return isinstance(self.node(key), ast.ClassDef)

    def bases(self, key):
        out = []
        for base in self.node(key).bases:
            sym = self.expr_symbol(key[0], base)
            if sym and sym[0] == "def" and self.is_class(sym[1]):
                out.append(sym[1])
        return out

    def is_torch_module(self, key, depth=0):
        for base in self.node(key).bases:
            if dotted(base).split(".")[-1] == "Module":
                return True
        return depth < 10 and any(self.is_torch_module(b, depth + 1) for b in self.bases(key))

    def is_autograd_function(self, key):
        return any(dotted(base).split(".")[-1] == "Function" for base in self.node(key).bases)

    def method(self, cls, name, depth=0):
        qual = f"{cls[1]}.{name}"
        if qual in self.modules[cls[0]].defs:
            return (cls[0], qual)
        for base in self.bases(cls) if depth < 10 else ():
            found = self.method(base, name, depth + 1)
            if found:
                return found
        return None

    def constructed(self, cls):
        """What calling class cls runs (R2)."""
        return self.method(cls, "__init__") or cls

    def called_instance(self, cls):
        """What calling an instance of cls runs (R3)."""
        return self.method(cls, "forward" if self.is_torch_module(cls) else "__call__")

    # Types (R3) -------------------------------------------------------------------------------

    def returns(self, key):
        """Classes a function returns: {"one": set, n: [set] * n for n-tuples}."""
        if key in self.returns_cache:
            return self.returns_cache[key]
        self.returns_cache[key] = {}
        fn = self.node(key)
        out = {}
        if not isinstance(fn, ast.ClassDef):
            types = self.local_types(key)
            for node in own_nodes(fn):
                if isinstance(node, ast.Return) and node.value is not None:
                    if isinstance(node.value, ast.Tuple):
                        shapes = out.setdefault(len(node.value.elts), [set() for _ in node.value.elts])
                        for i, elt in enumerate(node.value.elts):
                            shapes[i] |= self.expr_types(key[0], elt, types)
                    else:
                        out.setdefault("one", set()).update(self.expr_types(key[0], node.value, types))
        self.returns_cache[key] = out
        return out

    def expr_types(self, modname, node, types):
        if isinstance(node, ast.Name) and node.id in types:
            return set(types[node.id])
        if isinstance(node, ast.Call):
            sym = self.expr_symbol(modname, node.func)
            if sym and sym[0] == "def":
                if self.is_class(sym[1]):
                    return {sym[1]}
                return set(self.returns(sym[1]).get("one", ()))
        return set()

    def local_types(self, key):
        """Local variable -> classes, from assignments anywhere in the function (not flow-sensitive)."""
        modname, fn = key[0], self.node(key)
        types = {}
        for node in own_nodes(fn):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    self.bind(modname, target, node.value, types)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if isinstance(item.optional_vars, ast.Name):
                        self.bind(modname, item.optional_vars, item.context_expr, types)
        return types

    def bind(self, modname, target, value, types):
        if isinstance(target, ast.Name):
            found = self.expr_types(modname, value, types)
            if found:
                types.setdefault(target.id, set()).update(found)
        elif isinstance(target, ast.Tuple) and isinstance(value, ast.Call):
            sym = self.expr_symbol(modname, value.func)
            if sym and sym[0] == "def" and not self.is_class(sym[1]):
                shapes = self.returns(sym[1]).get(len(target.elts), [])
                for elt, found in zip(target.elts, shapes):
                    if isinstance(elt, ast.Name) and found:
                        types.setdefault(elt.id, set()).update(found)

    # Calls ------------------------------------------------------------------------------------

    def targets(self, key, nodes, types, cls=None):
        """(call node or None, reached definition, how) for the calls and references in nodes."""
        modname = key[0]
        call_funcs = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
        out = []
        for node in nodes:
            if isinstance(node, ast.Call):
                for target, how in self.call_targets(modname, node.func, types, cls):
                    out.append((node, target, how))
            elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load) \
                    and id(node) not in call_funcs:
                sym = self.expr_symbol(modname, node)
                if sym and sym[0] == "def" and not self.is_class(sym[1]):
                    out.append((None, sym[1], "R5"))
                elif sym and sym[0] == "const":
                    value = self.modules[sym[1]].consts[sym[2]]
                    for inner in ast.walk(value):
                        if isinstance(inner, (ast.Name, ast.Attribute)):
                            found = self.expr_symbol(sym[1], inner)
                            if found and found[0] == "def" and not self.is_class(found[1]):
                                out.append((None, found[1], "R5"))
        return out

    def call_targets(self, modname, func, types, cls):
        if isinstance(func, ast.Name):
            if func.id in types:
                return [(t, "R3") for t in filter(None, map(self.called_instance, sorted(types[func.id])))]
            sym = self.symbol(modname, func.id)
            if sym and sym[0] == "def":
                return [(self.constructed(sym[1]), "R2")] if self.is_class(sym[1]) else [(sym[1], "R1")]
            return [] if sym else [(None, "unresolved")]
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            base, attr = func.value.id, func.attr
            if base == "self" and cls is not None:
                found = self.method(cls, attr)
                return [(found, "R4")] if found else []
            if base in types:
                return [(t, "R3") for t in filter(None, (self.method(c, attr) for c in sorted(types[base])))]
            sym = self.symbol(modname, base)
            if sym and sym[0] == "module":
                inner = self.symbol(sym[1], attr)
                if inner and inner[0] == "def":
                    return [(self.constructed(inner[1]), "R2")] if self.is_class(inner[1]) else [(inner[1], "R1")]
                return []
            if sym and sym[0] == "def" and self.is_class(sym[1]):
                if attr == "apply" and self.is_autograd_function(sym[1]):
                    return [(m, "R2") for m in (self.method(sym[1], "forward"), self.method(sym[1], "backward")) if m]
                found = self.method(sym[1], attr)
                return [(found, "R1")] if found else []
            if sym is None and not attr.startswith("__") and attr not in ("forward", "backward"):
                candidates = self.methods_by_name.get(attr, [])
                if len(candidates) == 1:
                    return [(candidates[0], "R6")]
        return []

    def class_of(self, key):
        if "." in key[1]:
            return (key[0], key[1].split(".")[0])
        return None

    def walk(self, start, extra_unresolved=()):
        """Definitions reached from start = [(key, nodes, types)], breadth first: {key: how}, edges."""
        reached, edges, queue = {}, [], list(start)
        while queue:
            key, nodes, types = queue.pop(0)
            for call, target, how in self.targets(key, nodes, types, self.class_of(key)):
                targets = list(extra_unresolved) if how == "unresolved" else [target]
                for t in targets:
                    edges.append((key, call, t))
                    if t not in reached:
                        reached[t] = how
                        queue.append((t, own_nodes(self.node(t), whole=True), self.local_types(t)))
        return reached, edges

    def def_lines(self, key):
        node = self.node(key)
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if isinstance(node, ast.ClassDef):
            methods = [n.lineno for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            return (min(methods) - 1 if methods else node.end_lineno) - first + 1
        return node.end_lineno - first + 1


def dotted(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def own_nodes(fn, whole=False):
    """The nodes of a function's body (nested functions and lambdas included when whole, as a reader
    reads them; returns of nested functions are not the function's own)."""
    out, stack = [], list(fn.body) if not isinstance(fn, ast.ClassDef) else []
    while stack:
        node = stack.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            if whole or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                stack.append(child)
    out.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    return out


# ---------------------------------------------------------------------------------------------
# The figures


def top_level(repo):
    entries = sorted({p.split("/")[0] for p in repo.files})
    return {"entries": len(entries), "py_files": sum(e.endswith(".py") for e in entries),
            "folders": len({p.split("/")[0] for p in repo.files if "/" in p}), "names": entries}


def readme(repo):
    path = repo.root / "README.md"
    if not path.is_file():
        return None
    data = path.read_bytes()
    return {"bytes": len(data), "lines": len(data.decode("utf-8").splitlines())}


def apo_step(repo):
    if "apo" not in repo.modules or "train" not in repo.modules["apo"].defs:
        return None
    root = ("apo", "train")
    train = repo.node(root)
    loop = next((n for n in ast.walk(train) if isinstance(n, ast.For) and isinstance(n.target, ast.Name)
                 and n.target.id == "step"), None)
    if loop is None:
        return None
    loop_nodes = [n for stmt in loop.body for n in ast.walk(stmt)]
    # R7: the model the loop calls is an nn.Module of the repository constructed in apo.py.
    constructed = set()
    for qual in repo.modules["apo"].defs:
        key = ("apo", qual)
        for node in own_nodes(repo.node(key), whole=True):
            if isinstance(node, ast.Call):
                sym = repo.expr_symbol("apo", node.func)
                if sym and sym[0] == "def" and repo.is_class(sym[1]) and repo.is_torch_module(sym[1]):
                    constructed.add(sym[1])
    models = [m for m in map(repo.called_instance, sorted(constructed)) if m]
    reached, _ = repo.walk([(root, loop_nodes, repo.local_types(root))], extra_unresolved=models)
    reached.pop(root, None)
    loop_lines = loop.end_lineno - loop.lineno + 1
    defs = sorted(reached)
    files = sorted({repo.modules[m].path for m, _ in defs} | {"apo.py"})
    return {"lines": loop_lines + sum(repo.def_lines(k) for k in defs), "definitions": 1 + len(defs),
            "files": len(files), "file_names": files, "loop_lines": loop_lines,
            "train_lines": repo.def_lines(root),
            "reached": [f"{repo.modules[m].path}:{q} ({repo.def_lines((m, q))} lines, {reached[(m, q)]})"
                        for m, q in defs]}


def identifiers(node):
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            yield n.id
        elif isinstance(n, ast.Attribute):
            yield n.attr
        elif isinstance(n, ast.keyword) and n.arg:
            yield n.arg
        elif isinstance(n, ast.alias):
            yield n.asname or n.name
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield n.name


def is_plumbing(identifier):
    words = [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", identifier)]
    snake = "_".join(words)
    return any(w in PLUMBING_WORDS for w in words) or any(p in snake for p in PLUMBING_PHRASES)


def names_plumbing(nodes, tainted):
    return any(is_plumbing(i) or i in tainted for node in nodes if node is not None for i in identifiers(node))


def bound_names(targets):
    return {n.id for t in targets if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)}


def code_lines(source, tree):
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            lines.update(range(tok.start[0], tok.end[0] + 1))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines -= set(range(first.lineno, first.end_lineno + 1))
    return lines


def plumbing_lines(stmts, marked, tainted):
    """Marks the plumbing lines of stmts; tainted: the names bound by plumbing statements so far
    in this scope (a name bound again by a statement that is not plumbing is no longer tainted)."""
    def span(a, b):
        marked.update(range(a, b + 1))

    def bind(targets, plumbing):
        names = bound_names(targets)
        if plumbing:
            tainted.update(names)
        else:
            tainted.difference_update(names)

    for s in stmts:
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([s.lineno] + [d.lineno for d in s.decorator_list])
            if is_plumbing(s.name):
                span(first, s.end_lineno)
                continue
            if names_plumbing(s.decorator_list, tainted):
                span(first, s.body[0].lineno - 1)
            plumbing_lines(s.body, marked, set())
        elif isinstance(s, (ast.If, ast.While)):
            if names_plumbing([s.test], tainted):
                span(s.lineno, s.body[-1].end_lineno)
            else:
                plumbing_lines(s.body, marked, tainted)
            plumbing_lines(s.orelse, marked, tainted)
        elif isinstance(s, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)):
            loop = isinstance(s, (ast.For, ast.AsyncFor))
            header = [s.iter] if loop else [i.context_expr for i in s.items]
            plumbing = names_plumbing(header, tainted)
            if plumbing:
                span(s.lineno, max(s.lineno, s.body[0].lineno - 1))
            bind([s.target] if loop else [i.optional_vars for i in s.items], plumbing)
            plumbing_lines(s.body, marked, tainted)
            plumbing_lines(getattr(s, "orelse", []), marked, tainted)
        elif isinstance(s, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            plumbing_lines(s.body, marked, tainted)
            for h in s.handlers:
                if names_plumbing([h.type], tainted):
                    span(h.lineno, h.end_lineno)
                else:
                    plumbing_lines(h.body, marked, tainted)
            plumbing_lines(s.orelse, marked, tainted)
            plumbing_lines(s.finalbody, marked, tainted)
        elif isinstance(s, ast.Match):
            for case in s.cases:
                plumbing_lines(case.body, marked, tainted)
        else:
            plumbing = names_plumbing([s], tainted)
            if plumbing:
                span(s.lineno, s.end_lineno)
            if isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                bind(s.targets if isinstance(s, ast.Assign) else [s.target], plumbing)


def plumbing_share(source, tree):
    code = code_lines(source, tree)
    marked = set()
    plumbing_lines(tree.body, marked, set())
    plumbing = code & marked
    return {"code_lines": len(code), "plumbing_lines": len(plumbing),
            "share": round(len(plumbing) / len(code), 3) if code else None}


def plumbing(repo):
    out = {}
    for stage in STAGES:
        if stage in repo.modules:
            m = repo.modules[stage]
            out[stage] = plumbing_share(m.source, m.tree)
    return out


def is_args(node):
    """The parsed flags: the name `args`, or a call of parse_args(...)."""
    return (isinstance(node, ast.Name) and node.id == "args") or (
        isinstance(node, ast.Call) and dotted(node.func).split(".")[-1] == "parse_args")


def structure(repo):
    product = sorted(m.path for m in repo.modules.values())
    arrows = set()
    for m in repo.modules.values():
        for name in m.imported:
            if name in repo.modules and name != m.name:
                arrows.add((m.name, name))
    stages = {}
    for stage in STAGES:
        if stage not in repo.modules or "main" not in repo.modules[stage].defs:
            continue
        root = (stage, "main")
        reached, edges = repo.walk([(root, own_nodes(repo.node(root), whole=True), repo.local_types(root))])
        reached[root] = "root"
        kind = lambda key: repo.modules[key[0]].kind  # noqa: E731
        where = lambda key: f"{repo.modules[key[0]].path}:{key[1]}"  # noqa: E731
        passes, seen, args_hops = [], set(), set()
        for caller, call, callee in edges:
            if call is None or (caller, id(call), callee) in seen:
                continue
            seen.add((caller, id(call), callee))
            call_args = list(call.args) + [k.value for k in call.keywords]
            args_named = any(is_args(a) for a in call_args)
            text = f"{where(caller)} line {call.lineno}: {ast.unparse(call.func)}(...)"
            if args_named and caller[0] != callee[0]:
                args_hops.add((caller, id(call)))
            if kind(caller) == "shared" and kind(callee) == "stage":
                passes.append((args_named, f"{text} -> {where(callee)}"))
            elif kind(callee) == "shared":
                for arg in call_args:
                    if isinstance(arg, ast.Lambda) and kind(caller) == "stage":
                        passes.append((args_named or any(is_args(n) for n in ast.walk(arg.body)),
                                       f"{text} calls back a lambda of {repo.modules[caller[0]].path}"))
                    else:
                        sym = repo.expr_symbol(caller[0], arg)
                        if sym and sym[0] == "def" and kind(sym[1]) == "stage":
                            passes.append((args_named, f"{text} calls back {where(sym[1])}"))
        files = sorted({repo.modules[m].path for m, _ in reached})
        stages[stage] = {"files_entered": len(files), "files": files, "definitions_reached": len(reached),
                         "args_passes_back_up": sum(p[0] for p in passes), "passes_back_up": len(passes),
                         "passes": [f"{'args: ' if p[0] else ''}{p[1]}" for p in passes],
                         "args_cross_file_calls": len(args_hops)}
    return {"product_files": len(product), "import_arrows": len(arrows),
            "arrows": [f"{a} -> {b}" for a, b in sorted(arrows)], "stages": stages}


def measure(root):
    repo = Repo(Path(root))
    return {"root": str(repo.root), "top_level": top_level(repo), "readme": readme(repo), "apo_step": apo_step(repo),
            "plumbing_words": list(PLUMBING_WORDS), "plumbing_phrases": list(PLUMBING_PHRASES),
            "plumbing": plumbing(repo), "structure": structure(repo)}


def report(r):
    t, rd, step, s = r["top_level"], r["readme"], r["apo_step"], r["structure"]
    print(f"layout of {r['root']}")
    print(f"1. top level: {t['entries']} entries, {t['py_files']} .py, {t['folders']} folders")
    print(f"2. README.md: {rd['bytes']} bytes, {rd['lines']} lines" if rd else "2. README.md: none")
    if step:
        print(f"3. one APO step: {step['lines']} lines, {step['definitions']} definitions, {step['files']} files "
              f"({', '.join(step['file_names'])}); the loop {step['loop_lines']} lines of train's {step['train_lines']}")
    print("4. plumbing share (words: " + ", ".join(r["plumbing_words"]) + "; phrases: "
          + ", ".join(r["plumbing_phrases"]) + ")")
    for stage, p in r["plumbing"].items():
        print(f"   {stage:10s} {p['plumbing_lines']:4d} / {p['code_lines']:4d} code lines = {100 * p['share']:.0f}%")
    print(f"5. structure: {s['product_files']} product .py files, {s['import_arrows']} import arrows")
    for stage, st in s["stages"].items():
        print(f"   from {stage}.main: {st['files_entered']} files entered, {st['args_passes_back_up']} passes of args "
              f"back up into the stage ({st['passes_back_up']} back-up calls in all); args handed across files "
              f"{st['args_cross_file_calls']} times")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--json", help="also write the figures (with the lists behind them) to this file")
    ap.add_argument("--verbose", action="store_true", help="also print the lists behind the figures")
    ap.add_argument("--plumbing-of", metavar="FILE", help="only the plumbing share of this one file, its plumbing lines marked")
    args = ap.parse_args(argv)
    if args.plumbing_of:
        source = Path(args.plumbing_of).read_text(encoding="utf-8")
        tree = ast.parse(source)
        marked = set()
        plumbing_lines(tree.body, marked, set())
        code = code_lines(source, tree)
        for i, line in enumerate(source.splitlines(), 1):
            print(f"{i:5d} {'P' if i in code & marked else ' ' if i in code else '-'} {line}")
        share = plumbing_share(source, tree)
        print(f"{args.plumbing_of}: {share['plumbing_lines']} / {share['code_lines']} code lines are plumbing")
        return
    result = measure(args.root)
    report(result)
    if args.verbose:
        print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
