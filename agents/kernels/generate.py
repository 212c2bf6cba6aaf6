"""The built-in candidate generator: a search over a candidate's launch parameters.

A tunable is an integer in the source that the search may rewrite. Four kinds:

    constant   a module-level `NAME = <int>` with an UPPERCASE name
    launch     a literal at a kernel launch `k[grid](..., BLOCK=1024, num_warps=4)`:
               a `tl.constexpr` parameter of the kernel (by keyword or position),
               `num_warps` or `num_stages`
    autotune   a value inside `@triton.autotune(configs=[triton.Config({...},
               num_warps=..., num_stages=...), ...])`; the search also adds configs

Allowed values come from a `# tune: 16, 32, 64` comment on the same line (for a
launch or config literal only when it is the one tunable on that line), else
from the name:

    NUM_WARPS / num_warps    1, 2, 4, 8
    NUM_STAGES / num_stages  1, 2, 3, 4
    GROUP_SIZE*/GROUP_M      1, 2, 4, 8
    BLOCK*, TILE*, BM/BN/BK  powers of two 16 .. 1024 (plus the current value)

Other ints are left alone: we cannot know what they mean. A value that reaches
`tl.arange` or a tensor shape inside a kernel, or `num_warps`, keeps to powers
of two whatever a comment lists.

The grid must follow a block size. The grid of a launch is read with every
local name it uses, back to its assignments; a literal there equal to a tuned
launch value and standing as a divisor (`triton.cdiv(n, 1024)`, `n // 1024`,
`(n + 1023) // 1024`) is rewritten with it. When the same value also appears
where its role is unknown, or other launch values share it, or the grid comes
from code we cannot see (a helper, `self.`), the launch literal is not tuned:
a rewrite never touches a number that is not provably the same parameter. A
grid written as `lambda meta: (triton.cdiv(n, meta["BLOCK"]),)` needs nothing.

A rewrite touches only the numbers in the source, so comments and layout
survive. Programs are compared by a hash of their AST, which ignores comments
and formatting.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

_TUNE_COMMENT = re.compile(r"#\s*tune:\s*([0-9][0-9,\s]*)")
_BLOCK_NAME = re.compile(r"(BLOCK|TILE).*|B[MNK]")
_ENUMERATE_LIMIT = 4096
_MAX_CONFIGS = 8  # an autotune list is not grown past this
_PERF_KWARGS = ("num_warps", "num_stages")  # launch options that never change results
# Triton calls whose arguments are tensor shapes: a constexpr there must be a power of two.
_SHAPE_CALLS = frozenset({"arange", "zeros", "full", "reshape", "view", "broadcast_to"})


@dataclass(frozen=True)
class Site:
    """One number in the source; it holds the tunable's value plus `delta`."""

    lineno: int
    col_offset: int  # UTF-8 byte columns, as ast reports them
    end_col_offset: int
    delta: int = 0  # -1 for the `1023` of `(n + 1023) // 1024`


@dataclass(frozen=True)
class Tunable:
    name: str
    value: int
    choices: tuple[int, ...]
    lineno: int
    col_offset: int
    end_col_offset: int
    kind: str = "constant"  # constant | launch | autotune
    sites: tuple[Site, ...] = ()  # further numbers rewritten with it (grid divisors, tied literals)

    def all_sites(self) -> tuple[Site, ...]:
        return (Site(self.lineno, self.col_offset, self.end_col_offset), *self.sites)


def _default_choices(name: str, value: int) -> tuple[int, ...] | None:
    key = name.upper()
    if key == "NUM_WARPS":
        base: set[int] = {1, 2, 4, 8}
    elif key == "NUM_STAGES":
        base = {1, 2, 3, 4}
    elif key.startswith("GROUP_SIZE") or key == "GROUP_M":
        base = {1, 2, 4, 8}
    elif _BLOCK_NAME.fullmatch(key):
        base = {1 << k for k in range(4, 11)}
    else:
        return None
    return tuple(sorted(base | {value}))


def _int(node: ast.AST | None) -> int | None:
    """The value of an int literal (bools are not ints here), else None."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _site(node: ast.expr, delta: int = 0) -> Site | None:
    if node.end_lineno != node.lineno or node.end_col_offset is None:
        return None
    return Site(node.lineno, node.col_offset, node.end_col_offset, delta)


def _callee(func: ast.expr) -> str | None:
    """`triton.cdiv` and `cdiv` both name `cdiv`."""
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def _comment_choices(line: str, value: int) -> tuple[int, ...] | None:
    match = _TUNE_COMMENT.search(line)
    if not match:
        return None
    listed = [int(tok) for tok in re.split(r"[,\s]+", match.group(1).strip()) if tok]
    return tuple(sorted(set(listed) | {value}))


# ---- what the source holds: kernels, constants, scopes ---------------------------------------


@dataclass
class _Kernel:
    name: str
    params: list[str]
    constexprs: set[str]
    shaped: set[str]  # names used as tensor shapes inside the body: powers of two only
    autotune: ast.Call | None


@dataclass
class _Module:
    tree: ast.Module
    lines: list[str]
    kernels: dict[str, _Kernel]
    assigns: dict[str, list[ast.expr]]  # module-level name -> assigned values
    int_constants: dict[str, ast.Constant]  # assigned once, to an int
    callables: set[str]  # module-level defs and classes: code the grid scan cannot see into

    def line(self, lineno: int) -> str:
        return self.lines[lineno - 1] if 0 < lineno <= len(self.lines) else ""


def _is_constexpr(annotation: ast.expr | None) -> bool:
    return annotation is not None and _callee(annotation) == "constexpr"


def _read_kernel(fn: ast.FunctionDef) -> _Kernel | None:
    jit, autotune = False, None
    for dec in fn.decorator_list:
        name = _callee(dec.func if isinstance(dec, ast.Call) else dec)
        if name == "jit":
            jit = True
        elif name == "autotune" and isinstance(dec, ast.Call):
            autotune = dec
    if not jit:
        return None
    args = [*fn.args.posonlyargs, *fn.args.args]
    constexprs = {a.arg for a in [*args, *fn.args.kwonlyargs] if _is_constexpr(a.annotation)}
    shaped: set[str] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and _callee(node.func) in _SHAPE_CALLS:
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                shaped |= {n.id for n in ast.walk(arg) if isinstance(n, ast.Name)}
    return _Kernel(fn.name, [a.arg for a in args], constexprs, shaped, autotune)


def _read_module(source: str) -> _Module:
    tree = ast.parse(source)
    kernels: dict[str, _Kernel] = {}
    callables: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            callables.add(node.name)
            kernel = _read_kernel(node) if isinstance(node, ast.FunctionDef) else None
            if kernel is not None:
                kernels[kernel.name] = kernel
    assigns = _collect_bindings(tree.body)
    int_constants = {name: vals[0] for name, vals in assigns.items()
                     if len(vals) == 1 and isinstance(vals[0], ast.Constant) and _int(vals[0]) is not None}
    return _Module(tree, source.splitlines(), kernels, assigns, int_constants, callables)


def _bindings(stmt: ast.AST) -> Iterator[tuple[str, ast.expr]]:
    """(name, the expression it is bound from) for one statement; tuple targets bind each name
    to the whole value, which is conservative: the scan then sees every number it holds."""
    targets: list[ast.expr] = []
    value: ast.expr | None = None
    if isinstance(stmt, ast.Assign):
        targets, value = stmt.targets, stmt.value
    elif isinstance(stmt, ast.AnnAssign | ast.AugAssign) and stmt.value is not None:
        targets, value = [stmt.target], stmt.value
    elif isinstance(stmt, ast.For | ast.AsyncFor):
        targets, value = [stmt.target], stmt.iter
    elif isinstance(stmt, ast.NamedExpr):
        targets, value = [stmt.target], stmt.value
    elif isinstance(stmt, ast.withitem) and stmt.optional_vars is not None:
        targets, value = [stmt.optional_vars], stmt.context_expr
    if value is None:
        return
    for target in targets:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                yield node.id, value


@dataclass
class _Scope:
    """The local names of one function: what each is bound from, and its parameters."""

    assigns: dict[str, list[ast.expr]]
    params: set[str]
    defaults: dict[str, ast.expr]  # a parameter's default: a number the grid may read


def _collect_bindings(body: list[ast.stmt]) -> dict[str, list[ast.expr]]:
    """Every name bound in a block, at any depth (if, for, with), not inside nested defs."""
    assigns: dict[str, list[ast.expr]] = {}
    pending: list[ast.AST] = list(body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue  # their names are their own
        for name, value in _bindings(node):
            assigns.setdefault(name, []).append(value)
        pending.extend(ast.iter_child_nodes(node))
    return assigns


def _scope_of(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> _Scope:
    assigns = _collect_bindings(fn.body)
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    params = {x.arg for x in [*positional, *a.kwonlyargs]}
    params |= {x.arg for x in (a.vararg, a.kwarg) if x is not None}
    defaults = {x.arg: d for x, d in zip(positional[len(positional) - len(a.defaults):], a.defaults,
                                         strict=True)}
    defaults |= {x.arg: d for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None}
    return _Scope(assigns, params, defaults)


def _launches(mod: _Module) -> Iterator[tuple[ast.Call, _Kernel, list[_Scope]]]:
    """Every `kernel[grid](...)` call, with the scopes around it (innermost first)."""

    def walk(node: ast.AST, scopes: list[_Scope]) -> Iterator[tuple[ast.Call, _Kernel, list[_Scope]]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                if child.name in mod.kernels and node is mod.tree:
                    continue
                yield from walk(child, [_scope_of(child), *scopes])
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Subscript) \
                    and isinstance(child.func.value, ast.Name) and child.func.value.id in mod.kernels:
                yield child, mod.kernels[child.func.value.id], scopes
            yield from walk(child, scopes)

    yield from walk(mod.tree, [])


# ---- the grid of a launch --------------------------------------------------------------------


@dataclass
class _Grid:
    divisors: dict[int, list[Site]] = field(default_factory=dict)  # value -> where it divides
    others: set[int] = field(default_factory=set)  # numbers whose role we do not know
    constants: set[str] = field(default_factory=set)  # module int constants it reads
    opaque: bool = False  # it depends on code we cannot read (a helper, self.<attr>, a parameter)


def _scan_grid(grid: ast.expr, scopes: list[_Scope], mod: _Module) -> _Grid:
    out = _Grid()
    seen: set[str] = set()
    pending: list[ast.expr] = [grid]
    no_names: frozenset[str] = frozenset()

    def divisor(node: ast.expr, bound: frozenset[str], delta: int = 0) -> None:
        site, value = _site(node, delta), _int(node)
        if value is not None and site is not None:
            out.divisors.setdefault(value - delta, []).append(site)
        else:
            visit(node, bound)

    def resolve(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for scope in scopes:
            if name in scope.assigns:
                pending.extend(scope.assigns[name])
                return
            if name in scope.params:  # data handed in (tensors, sizes), or its default
                pending.extend([scope.defaults[name]] if name in scope.defaults else [])
                return
        if name in mod.int_constants:
            out.constants.add(name)
        elif name in mod.callables:
            out.opaque = True
        else:
            pending.extend(mod.assigns.get(name, []))

    def visit(node: ast.expr, bound: frozenset[str]) -> None:
        """`bound`: names of the lambdas around `node`, which no assignment reaches."""
        if isinstance(node, ast.Constant):
            if (value := _int(node)) is not None:
                out.others.add(value)
        elif isinstance(node, ast.Lambda):
            for default in [*node.args.defaults, *node.args.kw_defaults]:
                if default is not None:
                    visit(default, bound)
            a = node.args
            visit(node.body, bound | {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]})
        elif isinstance(node, ast.Name):
            if node.id not in bound:
                resolve(node.id)
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                out.opaque = True
            visit(node.value, bound)
        elif isinstance(node, ast.Subscript):
            visit(node.value, bound)
            if _int(node.slice) is None:  # x.shape[0]: an index, not a size
                visit(node.slice, bound)
        elif isinstance(node, ast.Call) and _callee(node.func) == "cdiv" and len(node.args) == 2:
            visit(node.func, bound)
            visit(node.args[0], bound)
            divisor(node.args[1], bound)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.FloorDiv | ast.Div) \
                and (size := _int(node.right)) is not None:
            left = node.left
            divisor(node.right, bound)
            # Ceiling division written out: (n + B - 1) // B or (n + (B-1)) // B.
            if isinstance(left, ast.BinOp) and isinstance(left.op, ast.Add) \
                    and _int(left.right) == size - 1:
                divisor(left.right, bound, -1)
                visit(left.left, bound)
            elif isinstance(left, ast.BinOp) and isinstance(left.op, ast.Sub) and _int(left.right) == 1 \
                    and isinstance(left.left, ast.BinOp) and isinstance(left.left.op, ast.Add) \
                    and _int(left.left.right) == size:
                divisor(left.left.right, bound)
                visit(left.left.left, bound)
            else:
                visit(left, bound)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    visit(child, bound)
                elif isinstance(child, ast.keyword | ast.comprehension):
                    for sub in ast.iter_child_nodes(child):
                        if isinstance(sub, ast.expr):
                            visit(sub, bound)

    if isinstance(grid, ast.Name) and any(grid.id in s.params for s in scopes):
        out.opaque = True  # the grid itself comes from the caller
    while pending:
        visit(pending.pop(), no_names)
    return out


# ---- finding tunables --------------------------------------------------------------------------


@dataclass
class _Unit:
    """One thing the search can set: a constant, a launch literal or a config entry."""

    key: str
    name: str
    kind: str
    value: int
    site: Site
    choices: tuple[int, ...] | None  # None: a grid divisor, free to follow any value
    pow2: bool = False


class _Groups:
    """Units that must move together (union-find), and the ones that must not move at all."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.dead: set[str] = set()

    def find(self, key: str) -> str:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, keys: list[str], dead: bool = False) -> None:
        roots = [self.find(k) for k in keys]
        for r in roots[1:]:
            if r != roots[0]:
                self.parent[r] = roots[0]
                if r in self.dead:
                    self.dead.add(roots[0])
        if dead and roots:
            self.dead.add(roots[0])

    def is_dead(self, key: str) -> bool:
        return self.find(key) in self.dead


def _site_key(site: Site) -> str:
    return f"@{site.lineno}:{site.col_offset}"


def _constant_units(mod: _Module) -> dict[str, _Unit]:
    units: dict[str, _Unit] = {}
    for node in mod.tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], _int(node.value)
        if not (isinstance(target, ast.Name) and target.id.isupper() and value is not None):
            continue
        site = _site(node.value)
        if site is None or mod.int_constants.get(target.id) is not node.value:
            continue
        choices = _comment_choices(mod.line(site.lineno), value) or _default_choices(target.id, value)
        if choices and len(choices) > 1:
            units[target.id] = _Unit(target.id, target.id, "constant", value, site, choices)
    return units


def _launch_args(call: ast.Call, kernel: _Kernel) -> Iterator[tuple[str | None, ast.expr]]:
    """(kernel parameter or launch option, value) for each argument of a launch."""
    for i, arg in enumerate(call.args):
        if isinstance(arg, ast.Starred):
            break  # positions after a *args are unknown
        yield (kernel.params[i] if i < len(kernel.params) else None), arg
    for kw in call.keywords:
        yield kw.arg, kw.value


def _config_entries(kernel: _Kernel, mod: _Module) -> list[ast.Call] | None:
    """The `triton.Config(...)` calls of an autotune decorator, when written out as a list."""
    if kernel.autotune is None:
        return None
    dec = kernel.autotune
    node = next((k.value for k in dec.keywords if k.arg == "configs"), dec.args[0] if dec.args else None)
    if isinstance(node, ast.Name) and len(mod.assigns.get(node.id, [])) == 1:
        node = mod.assigns[node.id][0]
    if not isinstance(node, ast.List | ast.Tuple) or not node.elts:
        return None
    calls = [e for e in node.elts if isinstance(e, ast.Call) and _callee(e.func) == "Config"]
    return calls if len(calls) == len(node.elts) else None


def _config_values(config: ast.Call) -> Iterator[tuple[str, ast.expr]]:
    if config.args and isinstance(config.args[0], ast.Dict):
        for k, v in zip(config.args[0].keys, config.args[0].values, strict=True):
            if isinstance(k, ast.Constant) and isinstance(k.value, str):
                yield k.value, v
    yield from zip(_PERF_KWARGS, config.args[1:3], strict=False)
    for kw in config.keywords:
        if kw.arg in _PERF_KWARGS:
            yield kw.arg, kw.value


def _literal_unit(key: str, name: str, kind: str, option: str, node: ast.expr,
                  per_line: dict[int, int], mod: _Module) -> _Unit | None:
    site, value = _site(node), _int(node)
    if site is None or value is None:
        return None
    choices = _default_choices(option, value)
    if per_line.get(site.lineno) == 1:  # a `# tune:` comment speaks for the one literal on its line
        choices = _comment_choices(mod.line(site.lineno), value) or choices
    return _Unit(key, name, kind, value, site, choices)


def _needs_pow2(option: str | None, kernel: _Kernel) -> bool:
    """Triton wants powers of two for tensor shapes and for num_warps."""
    return option == "num_warps" or option in kernel.shaped


def _tunable_literal(option: str | None, node: ast.expr, kernel: _Kernel) -> bool:
    value = _int(node)
    if option is None or value is None:
        return False
    known = option in _PERF_KWARGS or option in kernel.constexprs
    return known and _default_choices(option, value) is not None


def _launch_units(call: ast.Call, kernel: _Kernel, scopes: list[_Scope], label: str, mod: _Module,
                  units: dict[str, _Unit], groups: _Groups, per_line: dict[int, int]) -> None:
    """The literals of one launch as units, tied to the grid numbers that must follow them."""
    # value -> keys of the units that set a constexpr to it here.
    tied: dict[int, list[str]] = {}
    literal_values: set[int] = set()
    # Values held by arguments whose meaning we do not know: a grid divisor equal to one
    # of them might belong to that argument rather than to ours.
    foreign: set[int] = set()
    for option, node in _launch_args(call, kernel):
        if isinstance(node, ast.Name) and not any(node.id in s.assigns for s in scopes):
            if node.id in units and option is not None:
                unit = units[node.id]
                unit.pow2 |= _needs_pow2(option, kernel)
                if option in kernel.constexprs:
                    tied.setdefault(unit.value, []).append(unit.key)
            elif node.id in mod.int_constants and (value := _int(mod.int_constants[node.id])) is not None:
                foreign.add(value)
            continue
        value = _int(node)
        if value is None:
            continue
        literal: _Unit | None = None
        if option is not None and _tunable_literal(option, node, kernel) and (site := _site(node)):
            literal = _literal_unit(_site_key(site), f"{label}.{option}", "launch", option, node,
                                    per_line, mod)
        if literal is None:
            foreign.add(value)
            continue
        literal.pow2 = _needs_pow2(option, kernel)
        units[literal.key] = literal
        if option in kernel.constexprs:  # num_warps / num_stages never touch the grid
            tied.setdefault(value, []).append(literal.key)
            literal_values.add(value)
    assert isinstance(call.func, ast.Subscript)
    grid = _scan_grid(call.func.slice, scopes, mod)
    unknown_in_grid = set(grid.others)
    for name in grid.constants:
        if name in units:
            tied.setdefault(units[name].value, []).append(name)
        elif (value := _int(mod.int_constants[name])) is not None:
            unknown_in_grid.add(value)
    for value, keys in tied.items():
        divisor_sites = grid.divisors.get(value, [])
        if value not in literal_values and not divisor_sites:
            continue  # constants read by name stay consistent on their own
        for site in divisor_sites:
            units.setdefault(_site_key(site), _Unit(_site_key(site), "", "grid", value, site, None))
        members = list(dict.fromkeys([*keys, *(_site_key(s) for s in divisor_sites)]))
        ambiguous = value in unknown_in_grid or (value in foreign and bool(divisor_sites))
        hidden = grid.opaque and value in literal_values
        groups.join(members, dead=ambiguous or hidden)


def _find_units(mod: _Module) -> tuple[dict[str, _Unit], _Groups]:
    units = _constant_units(mod)
    groups = _Groups()
    # How many tunable literals each line holds, so a `# tune:` comment is never ambiguous.
    per_line: dict[int, int] = {}
    launches = list(_launches(mod))
    for call, kernel, _ in launches:
        for option, node in _launch_args(call, kernel):
            if _tunable_literal(option, node, kernel):
                per_line[node.lineno] = per_line.get(node.lineno, 0) + 1
    for kernel in mod.kernels.values():
        for config in _config_entries(kernel, mod) or []:
            for option, node in _config_values(config):
                if _int(node) is not None and _default_choices(option, 0) is not None:
                    per_line[node.lineno] = per_line.get(node.lineno, 0) + 1
    # Constants that reach a shape inside a kernel directly.
    for kernel in mod.kernels.values():
        for name in kernel.shaped & units.keys():
            units[name].pow2 = True

    launch_count: dict[str, int] = {}
    for call, kernel, scopes in launches:
        launch_count[kernel.name] = launch_count.get(kernel.name, 0) + 1
        nth = launch_count[kernel.name]
        label = kernel.name if nth == 1 else f"{kernel.name}#{nth}"
        _launch_units(call, kernel, scopes, label, mod, units, groups, per_line)

    for kernel in mod.kernels.values():
        for i, config in enumerate(_config_entries(kernel, mod) or []):
            for option, node in _config_values(config):
                if _int(node) is None or (site := _site(node)) is None:
                    continue
                name = f"{kernel.name}.configs[{i}].{option}"
                unit = _literal_unit(_site_key(site), name, "autotune", option, node, per_line, mod)
                if unit is not None and unit.choices is not None:
                    unit.pow2 = _needs_pow2(option, kernel)
                    units[unit.key] = unit
    return units, groups


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _merge(members: list[_Unit]) -> Tunable | None:
    """One tunable for units that move together; None when they cannot move."""
    owners = [u for u in members if u.choices is not None]
    if not owners:
        return None
    value = owners[0].value
    allowed = set(owners[0].choices or ())
    for u in owners[1:]:
        allowed &= set(u.choices or ())
    if any(u.pow2 for u in owners):
        allowed = {c for c in allowed if _is_pow2(c)} | {value}
    if len(allowed | {value}) < 2:
        return None
    # The constant, else the first literal in source order, names the group.
    order = sorted(owners, key=lambda u: (u.kind != "constant", u.site.lineno, u.site.col_offset))
    head = order[0]
    rest = sorted((u.site for u in members if u is not head),
                  key=lambda s: (s.lineno, s.col_offset))
    return Tunable(head.name, value, tuple(sorted(allowed | {value})), head.site.lineno,
                   head.site.col_offset, head.site.end_col_offset, head.kind, tuple(rest))


def find_tunables(source: str) -> list[Tunable]:
    """The rewritable launch parameters of a source, in source order."""
    mod = _read_module(source)
    units, groups = _find_units(mod)
    by_root: dict[str, list[_Unit]] = {}
    for key, unit in units.items():
        if groups.is_dead(key):
            continue
        by_root.setdefault(groups.find(key), []).append(unit)
    found = [t for members in by_root.values() if (t := _merge(members)) is not None]
    return sorted(found, key=lambda t: (t.lineno, t.col_offset))


def tunable_values(source: str) -> dict[str, int]:
    """Current values of the tunables (e.g. for a candidates table)."""
    return {t.name: t.value for t in find_tunables(source)}


def apply_values(source: str, values: dict[str, int], tunables: list[Tunable] | None = None) -> str:
    """`source` with the named tunables set to new values; everything else byte-identical."""
    tunables = find_tunables(source) if tunables is None else tunables
    edits: list[tuple[Site, int]] = []
    for t in tunables:
        if t.name in values and values[t.name] != t.value:
            edits.extend((site, int(values[t.name]) + site.delta) for site in t.all_sites())
    lines = source.splitlines(keepends=True)
    # ast offsets are UTF-8 byte columns; edit right to left so earlier ones hold.
    for site, number in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        raw = lines[site.lineno - 1].encode()
        raw = raw[: site.col_offset] + str(number).encode() + raw[site.end_col_offset :]
        lines[site.lineno - 1] = raw.decode()
    return "".join(lines)


def normalized_hash(source: str) -> str:
    """Hash of the program, blind to comments, whitespace and quoting style."""
    try:
        text = ast.dump(ast.parse(source), annotate_fields=False, include_attributes=False)
    except SyntaxError:
        text = source
    return hashlib.sha256(text.encode()).hexdigest()


# ---- autotune configs ----------------------------------------------------------------------------


def _configs_distinct(source: str) -> bool:
    """Every autotune list still holds distinct configs (a duplicate only costs tuning time)."""
    mod = _read_module(source)
    for kernel in mod.kernels.values():
        dumps = [ast.dump(c) for c in _config_entries(kernel, mod) or []]
        if len(dumps) != len(set(dumps)):
            return False
    return True


def _insert_config_copy(source: str, mod: _Module, configs: list[ast.Call], index: int) -> str:
    """`source` with a copy of `configs[index]` appended to its list."""
    copy = ast.get_source_segment(source, configs[index])
    last = configs[-1]
    assert copy is not None and last.end_lineno is not None and last.end_col_offset is not None
    lines = source.splitlines(keepends=True)
    end_raw = lines[last.end_lineno - 1].encode()
    tail = end_raw[last.end_col_offset :].decode()
    indent = mod.line(last.lineno)[: last.col_offset]
    own_line = indent.strip() == "" and configs[index].col_offset == last.col_offset
    if own_line and re.fullmatch(r"\s*,?\s*(#.*)?\s*", tail):
        # One config per line: the copy gets a line of its own below the last one.
        if not tail.lstrip().startswith(","):
            lines[last.end_lineno - 1] = (end_raw[: last.end_col_offset] + b"," + end_raw[last.end_col_offset :]).decode()
        lines.insert(last.end_lineno, f"{indent}{copy},\n")
        return "".join(lines)
    # Inside brackets layout is free: append after the last element.
    lines[last.end_lineno - 1] = (end_raw[: last.end_col_offset] + b", " + copy.encode()
                                  + end_raw[last.end_col_offset :]).decode()
    return "".join(lines)


def _grow_config(source: str, rng: random.Random) -> str | None:
    """A source whose autotune list has one more config: a copy of one with values moved."""
    mod = _read_module(source)
    lists = [(k, c) for k in mod.kernels.values()
             if (c := _config_entries(k, mod)) and len(c) < _MAX_CONFIGS]
    if not lists:
        return None
    kernel, configs = rng.choice(lists)
    grown = _insert_config_copy(source, mod, configs, rng.randrange(len(configs)))
    prefix = f"{kernel.name}.configs[{len(configs)}]."
    fresh = [t for t in find_tunables(grown) if t.name.startswith(prefix)]
    for _ in range(20):
        if not fresh:
            break
        picked = rng.sample(fresh, k=min(len(fresh), rng.choice((1, 1, 2))))
        src = apply_values(grown, {t.name: rng.choice([c for c in t.choices if c != t.value])
                                   for t in picked}, fresh)
        if _configs_distinct(src):
            return src
    return None


# ---- the search ------------------------------------------------------------------------------------


def template_variants(candidate_source: str, n: int, seed: int = 0) -> list[str]:
    """Up to `n` distinct programs that differ from the seed candidate in launch parameters.

    The seed itself is not included. Fewer than `n` come back when the space of
    values is smaller; none when the source has no tunables. Values are moved
    first; when they run out, autotune lists grow by a config.
    """
    if n <= 0:
        return []
    tunables = find_tunables(candidate_source)
    if not tunables:
        return []
    rng = random.Random(seed)
    current = tuple(t.value for t in tunables)
    space = 1
    for t in tunables:
        space *= len(t.choices)
    combos: list[tuple[int, ...]]
    if space <= _ENUMERATE_LIMIT:
        combos = [c for c in itertools.product(*(t.choices for t in tunables)) if c != current]
        rng.shuffle(combos)
    else:
        combos = []
        tried: set[tuple[int, ...]] = {current}
        for _ in range(n * 50):
            combo = tuple(rng.choice(t.choices) for t in tunables)
            if combo not in tried:
                tried.add(combo)
                combos.append(combo)
            if len(combos) >= 2 * n:
                break
    seen = {normalized_hash(candidate_source)}
    out: list[str] = []

    def keep(src: str) -> None:
        h = normalized_hash(src)
        if h not in seen:
            seen.add(h)
            out.append(src)

    for combo in combos:
        src = apply_values(candidate_source, {t.name: v for t, v in zip(tunables, combo, strict=True)}, tunables)
        if any(t.kind == "autotune" for t in tunables) and not _configs_distinct(src):
            continue
        keep(src)
        if len(out) >= n:
            return out
    for _ in range(4 * (n - len(out))):
        grown = _grow_config(candidate_source, rng)
        if grown is None:
            break
        keep(grown)
        if len(out) >= n:
            break
    return out


def mutate(parent_source: str, rng: random.Random) -> str:
    """A child of `parent_source` with one or two launch parameters moved.

    Mostly a step to a neighbouring allowed value (local search), sometimes a
    jump to any allowed value, and for an autotuned kernel sometimes one more
    config. Returns the parent unchanged only when it has no tunables; callers
    dedupe with normalized_hash.
    """
    tunables = find_tunables(parent_source)
    if not tunables:
        return parent_source
    if any(t.kind == "autotune" for t in tunables) and rng.random() < 0.25:
        grown = _grow_config(parent_source, rng)
        if grown is not None:
            return grown
    for _ in range(20):
        picked = rng.sample(tunables, k=min(len(tunables), rng.choice((1, 1, 2))))
        values: dict[str, int] = {}
        for t in picked:
            idx = t.choices.index(t.value)
            if rng.random() < 0.3:
                values[t.name] = rng.choice(t.choices)
            else:
                step = rng.choice((-1, 1))
                values[t.name] = t.choices[min(max(idx + step, 0), len(t.choices) - 1)]
        if any(values[t.name] != t.value for t in picked):
            child = apply_values(parent_source, values, tunables)
            if not any(t.kind == "autotune" for t in picked) or _configs_distinct(child):
                return child
    return parent_source
