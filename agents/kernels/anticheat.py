"""Static (AST) anti-cheat checks of a candidate's source.

The host code that runs for a forward call is `ModelNew.forward` plus every
module function and `ModelNew` method it calls (transitively); Triton kernel
bodies are excluded. Flags:

- no_triton_kernel    no @triton.jit kernel, or none launched (`k[grid](...)`) from forward
- torch_fallback      torch compute in forward: torch.*/F.* calls other than allocation,
                      `@`, compute tensor methods (.sum, .softmax, .numpy, ...), calling nn
                      submodules; anywhere: an alias of a torch compute function
                      (`sm = torch.softmax`, `getattr(torch, "softmax")`), torch.ops,
                      importing numpy, scipy, jax, cupy, numba, operator
- calls_reference     any use of the reference `Model`, or importing the problem/project
- try_fallback        try/except in forward's host code
- streams_or_threads  threading/multiprocessing/concurrent/asyncio, CUDA streams
- timer_tampering     importing time, assigning to attributes of torch/triton/time/...
- output_caching      module-level mutable containers, lru_cache, data_ptr, `global`,
                      state stored on self during forward
- unsafe_import       os, sys, subprocess, socket, ctypes, importlib, pickle, ...
- dynamic_code        eval/exec/compile/__import__/open/setattr, frame and globals access,
                      dunder names beyond __init__/__name__, torch's private modules
                      (torch._C, torch.utils._python_dispatch: how dispatch modes are evaded)

These are the first, cheap line; none of them is what the verdict rests on
(see docs/sandbox.md): a candidate that hides from them still meets the
trusted evaluator's comparison and clock, and the candidate-side guards.

A source that does not parse, or defines no ModelNew, yields no launch
findings: running it reports a compile_error, which says more than a flag would.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

REJECT_FLAGS = frozenset(
    {
        "no_triton_kernel",
        "torch_fallback",
        "calls_reference",
        "try_fallback",
        "streams_or_threads",
        "timer_tampering",
        "output_caching",
        "unsafe_import",
        "dynamic_code",
        # Dynamic only; listed so every reject flag lives here.
        "mutates_inputs",
        "timing_mismatch",
    }
)

ALLOWED_TORCH_CALLS = frozenset(
    {
        "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like",
        "full", "full_like", "arange", "device", "Size", "no_grad", "inference_mode",
        "is_tensor", "broadcast_shapes", "finfo", "iinfo", "get_default_dtype",
        "cuda.current_device", "cuda.device", "cuda.is_available", "cuda.synchronize",
        "cuda.get_device_capability", "cuda.get_device_properties",
    }
)
# Tensor methods that compute; allocation, views and metadata are not listed.
DENY_METHODS = frozenset(
    {
        "sum", "mean", "softmax", "log_softmax", "matmul", "mm", "bmm", "addmm", "baddbmm",
        "einsum", "exp", "exp_", "log", "log_", "relu", "relu_", "gelu", "silu", "sigmoid",
        "tanh", "clamp", "clamp_", "clip", "amax", "amin", "max", "min", "var", "std",
        "norm", "pow", "sqrt", "rsqrt", "abs", "neg", "where", "cumsum", "prod", "linear",
        "conv1d", "conv2d", "conv3d", "layer_norm", "maximum", "minimum", "topk", "argmax",
        "argmin", "masked_fill", "softplus", "erf", "square", "reciprocal", "logsumexp",
        "dot", "outer", "lerp", "addcmul", "addcdiv", "mul", "mul_", "div", "div_",
        "leaky_relu", "hardtanh", "elu", "selu", "mish", "tril", "triu",
        "numpy", "tolist", "__array__",
    }
)
NN_PARAM_CLASSES = frozenset({"Parameter", "ParameterList", "ParameterDict", "Buffer"})
THREAD_MODULES = frozenset({"threading", "_thread", "multiprocessing", "concurrent", "asyncio"})
TIME_MODULES = frozenset({"time", "timeit"})
UNSAFE_MODULES = frozenset(
    {
        "os", "sys", "subprocess", "socket", "ctypes", "cffi", "shutil", "signal", "resource",
        "importlib", "pickle", "marshal", "shelve", "urllib", "http", "requests", "httpx",
        "pathlib", "io", "builtins", "gc", "inspect", "mmap", "tempfile", "pty", "fcntl",
        "psutil", "runpy", "code", "codeop", "__main__", "weakref",
        # The project itself: the sandbox can import it, a kernel has no reason to.
        "agents", "schemas", "bus", "services", "ops", "msgspec", "nats",
    }
)
REFERENCE_MODULES = frozenset({"reference", "reference_problem", "jetfleet_reference"})
DYNAMIC_CALLS = frozenset(
    {"eval", "exec", "compile", "__import__", "open", "globals", "locals", "vars",
     "breakpoint", "setattr", "delattr"}
)
DUNDER_ESCAPES = frozenset(
    {"__globals__", "__builtins__", "__subclasses__", "__code__", "__closure__",
     "f_globals", "f_locals", "f_back", "gi_frame", "__dict__"}
)
PATCHABLE_ROOTS = frozenset({"torch", "triton", "time", "builtins", "math", "numpy"})
# Host compute outside both torch and Triton.
FALLBACK_MODULES = frozenset({"numpy", "scipy", "jax", "jaxlib", "cupy", "numba", "tensorflow",
                              "pandas", "operator", "torchvision", "xformers", "apex"})
# torch attributes a candidate may name without calling them: dtypes, types, namespaces.
TORCH_NAMES = frozenset({
    "Tensor", "nn", "cuda", "device", "dtype", "Size", "float16", "float32", "float64",
    "bfloat16", "half", "float", "double", "int8", "int16", "int32", "int64", "uint8", "bool",
    "long", "int", "short", "complex64", "complex128", "nn.Module", "nn.Parameter",
    "nn.ParameterList", "nn.ParameterDict", "nn.Buffer", "nn.init", "float8_e4m3fn", "float8_e5m2",
})
ALLOWED_DUNDERS = frozenset({"__init__", "__name__", "__qualname__", "__doc__"})
CACHE_DECORATORS = frozenset({"functools.lru_cache", "functools.cache", "functools.cached_property",
                              "lru_cache", "cache", "cached_property"})
MUTABLE_FACTORIES = frozenset({"dict", "list", "set", "OrderedDict", "defaultdict", "WeakValueDictionary",
                               "WeakKeyDictionary", "collections.OrderedDict", "collections.defaultdict"})


@dataclass(frozen=True, order=True)
class Finding:
    flag: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.flag} (line {self.line}): {self.message}"


def flags_of(findings: Iterable[Finding]) -> list[str]:
    return sorted({f.flag for f in findings})


class _Checker:
    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.findings: set[Finding] = set()
        self.aliases: dict[str, str] = {}
        self.functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
        self.kernels: dict[str, ast.AST] = {}
        self.model_new: ast.ClassDef | None = None
        self._inner: set[int] = set()

    def add(self, flag: str, node: ast.AST, message: str) -> None:
        self.findings.add(Finding(flag, getattr(node, "lineno", 0), message))

    # ---- names ----------------------------------------------------------------
    def dotted(self, node: ast.AST) -> str | None:
        """`F.softmax` -> 'torch.nn.functional.softmax' (aliases resolved), else None."""
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        root = self.aliases.get(node.id, node.id)
        return ".".join([root, *reversed(parts)])

    def is_module_rooted(self, node: ast.AST) -> bool:
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id in self.aliases

    # ---- passes -----------------------------------------------------------------
    def collect(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                    self.check_import(a.name, node)
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                self.check_import(mod, node)
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{mod}.{a.name}" if mod else a.name
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if self.is_kernel(node):
                    self.kernels[node.name] = node
                else:
                    self.functions[node.name] = node
            elif isinstance(node, ast.ClassDef) and node.name == "ModelNew":
                self.model_new = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                self.check_module_state(node)

    def is_kernel(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
        for dec in fn.decorator_list:
            target = dec.func if isinstance(dec, ast.Call) else dec
            name = self.dotted(target) or ""
            if name.startswith("triton.") and name.rsplit(".", 1)[-1] in {"jit", "autotune", "heuristics"}:
                return True
        return False

    def check_import(self, module: str, node: ast.AST) -> None:
        root = module.split(".")[0]
        if root in THREAD_MODULES:
            self.add("streams_or_threads", node, f"imports {module}")
        elif root in TIME_MODULES:
            self.add("timer_tampering", node, f"imports {module}")
        elif root in REFERENCE_MODULES:
            self.add("calls_reference", node, f"imports the reference module {module}")
        elif root in UNSAFE_MODULES:
            self.add("unsafe_import", node, f"imports {module}")
        elif root in FALLBACK_MODULES:
            self.add("torch_fallback", node, f"imports {module} (host compute outside Triton)")
        if root == "torch" and any(part.startswith("_") for part in module.split(".")):
            self.add("dynamic_code", node, f"imports torch internals ({module})")

    def check_module_state(self, node: ast.Assign | ast.AnnAssign) -> None:
        value = node.value
        if value is None:
            return
        mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp))
        if isinstance(value, ast.Call):
            mutable = (self.dotted(value.func) or "") in MUTABLE_FACTORIES
        if mutable:
            self.add("output_caching", node, "module-level mutable container (a cache across calls)")

    def host_scope(self) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
        """forward and the module functions / ModelNew methods it reaches."""
        if self.model_new is None:
            return []
        methods = {
            n.name: n for n in self.model_new.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        if "forward" not in methods:
            return []
        seen: dict[int, ast.FunctionDef | ast.AsyncFunctionDef] = {}
        todo = [methods["forward"]]
        while todo:
            fn = todo.pop()
            if id(fn) in seen:
                continue
            seen[id(fn)] = fn
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                if isinstance(f, ast.Name) and f.id in self.functions:
                    todo.append(self.functions[f.id])
                elif (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                      and f.value.id == "self" and f.attr in methods):
                    todo.append(methods[f.attr])
        return list(seen.values())

    def nn_submodules(self) -> set[str]:
        """Attributes that ModelNew.__init__ sets to torch.nn modules (calling them is torch compute)."""
        out: set[str] = set()
        if self.model_new is None:
            return out
        for node in ast.walk(self.model_new):
            if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Call):
                continue
            name = self.dotted(node.value.func) or ""
            if name.startswith("torch.nn.") and name.rsplit(".", 1)[-1] not in NN_PARAM_CLASSES:
                for t in node.targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        out.add(t.attr)
        return out

    def check_scope(self) -> None:
        if self.model_new is None:
            return  # no ModelNew at all: a compile_error when run, which says more
        scope = self.host_scope()
        if not self.kernels:
            self.add("no_triton_kernel", self.model_new or self.tree, "no @triton.jit kernel is defined")
        launched = False
        submodules = self.nn_submodules()
        forward = scope[0] if scope else None
        for fn in scope:
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    launched |= self.is_launch(node)
                    self.check_call(node, submodules)
                elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
                    self.add("torch_fallback", node, "matrix product with `@` in forward")
                elif isinstance(node, (ast.Try, ast.TryStar)):
                    self.add("try_fallback", node, "try/except in forward's host code")
                elif isinstance(node, ast.Global):
                    self.add("output_caching", node, "`global` state in forward")
                elif (fn is forward and isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                      and any(self.is_self_attr(t) for t in _targets(node))):
                    self.add("output_caching", node, "forward stores state on self")
        if self.kernels and not launched:
            self.add("no_triton_kernel", self.model_new or self.tree,
                     "no Triton kernel is launched (`kernel[grid](...)`) from ModelNew.forward")

    @staticmethod
    def is_self_attr(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"

    def is_launch(self, call: ast.Call) -> bool:
        f = call.func
        if isinstance(f, ast.Subscript):
            base = f.value
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            return name in self.kernels
        if isinstance(f, ast.Attribute) and f.attr == "run" and isinstance(f.value, ast.Name):
            return f.value.id in self.kernels
        return False

    def check_call(self, call: ast.Call, submodules: set[str]) -> None:
        f = call.func
        name = self.dotted(f)
        if name and name.startswith("torch.") and self.is_module_rooted(f):
            short = name.removeprefix("torch.")
            if short not in ALLOWED_TORCH_CALLS:
                self.add("torch_fallback", call, f"calls {name} in forward")
        elif isinstance(f, ast.Attribute) and not self.is_module_rooted(f):
            if f.attr in DENY_METHODS:
                self.add("torch_fallback", call, f"calls tensor method .{f.attr}() in forward")
            elif self.is_self_attr(f) and f.attr in submodules:
                self.add("torch_fallback", call, f"calls torch.nn submodule self.{f.attr} in forward")

    def check_everywhere(self) -> None:
        called = {id(n.func) for n in ast.walk(self.tree) if isinstance(n, ast.Call)}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Name) and node.id == "Model":
                self.add("calls_reference", node, "uses the reference class `Model`")
            elif isinstance(node, ast.Name) and _is_dunder(node.id) and node.id not in ALLOWED_DUNDERS:
                self.add("dynamic_code", node, f"uses {node.id}")
            elif isinstance(node, ast.Call):
                self.check_dynamic(node)
            if isinstance(node, ast.Attribute):
                self.check_torch_reference(node, called=id(node) in called)
            if isinstance(node, ast.Attribute):
                if node.attr in DUNDER_ESCAPES:
                    self.add("dynamic_code", node, f"accesses .{node.attr}")
                elif _is_dunder(node.attr) and node.attr not in ALLOWED_DUNDERS:
                    self.add("dynamic_code", node, f"accesses .{node.attr}")
                elif node.attr == "data_ptr":
                    self.add("output_caching", node, "uses data_ptr (results keyed by address)")
                elif node.attr in {"Stream", "stream", "set_stream", "ExternalStream"}:
                    self.add("streams_or_threads", node, f"uses .{node.attr}")
                elif node.attr in {"perf_counter", "perf_counter_ns", "monotonic", "elapsed_time"}:
                    self.add("timer_tampering", node, f"uses .{node.attr}")
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                for t in _targets(node):
                    self.check_patch(t)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for dec in node.decorator_list:
                    target = dec.func if isinstance(dec, ast.Call) else dec
                    if (self.dotted(target) or "") in CACHE_DECORATORS:
                        self.add("output_caching", dec, "memoising decorator")

    def check_torch_reference(self, node: ast.Attribute, *, called: bool) -> None:
        """torch internals anywhere; a torch function named without being called (an alias)."""
        name = self.dotted(node)
        if not name or not name.startswith("torch.") or not self.is_module_rooted(node):
            return
        short = name.removeprefix("torch.")
        parts = short.split(".")
        if any(p.startswith("_") and not _is_dunder(p) for p in parts):
            self.add("dynamic_code", node, f"reaches into torch internals ({name})")
        elif parts[0] in ("ops", "library", "overrides", "compile", "jit", "fx", "func", "vmap"):
            self.add("torch_fallback", node, f"uses {name}")
        elif (not called and isinstance(node.ctx, ast.Load) and not _torch_name_ok(short)
              and not self.is_inner_attribute(node)):
            self.add("torch_fallback", node, f"aliases {name} (torch compute by another name)")

    def is_inner_attribute(self, node: ast.Attribute) -> bool:
        """Whether `node` is the `value` of a longer attribute chain (checked as the longer one)."""
        return id(node) in self._inner

    def check_dynamic(self, call: ast.Call) -> None:
        f = call.func
        if isinstance(f, ast.Name) and f.id in DYNAMIC_CALLS and f.id not in self.aliases:
            self.add("dynamic_code", call, f"calls {f.id}()")
        elif isinstance(f, ast.Name) and f.id == "getattr" and len(call.args) >= 2:
            attr = call.args[1]
            if not isinstance(attr, ast.Constant):
                self.add("dynamic_code", call, "getattr() with a computed attribute name")
            elif isinstance(attr.value, str):
                target = self.dotted(call.args[0]) or ""
                if target.startswith("torch") and self.is_module_rooted(call.args[0]):
                    full = f"{target}.{attr.value}".removeprefix("torch").lstrip(".")
                    if not (full in ALLOWED_TORCH_CALLS or _torch_name_ok(full)):
                        self.add("torch_fallback", call, f"getattr() of torch.{full}")
                elif attr.value in DENY_METHODS:
                    self.add("torch_fallback", call, f"getattr() of the compute method .{attr.value}")

    def check_patch(self, target: ast.AST) -> None:
        if not isinstance(target, ast.Attribute):
            return
        name = self.dotted(target) or ""
        if self.is_module_rooted(target) and name.split(".")[0] in PATCHABLE_ROOTS:
            self.add("timer_tampering", target, f"monkey-patches {name}")


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _torch_name_ok(short: str) -> bool:
    """A torch attribute that is a type, dtype or namespace, or an allowed call."""
    if short in TORCH_NAMES or short in ALLOWED_TORCH_CALLS:
        return True
    parts = short.split(".")
    # torch.nn.<Class> (modules, parameters) and torch.cuda.<allowed> are fine;
    # torch.nn.functional.<f> is compute.
    if parts[0] == "nn" and (len(parts) == 1 or parts[1] not in ("functional",)):
        return True
    return parts[0] == "cuda" and short in ALLOWED_TORCH_CALLS


def _targets(node: ast.AST) -> Iterator[ast.AST]:
    if isinstance(node, ast.Assign):
        for t in node.targets:
            yield from _flatten_target(t)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        yield node.target
    elif isinstance(node, ast.Delete):
        yield from node.targets


def _flatten_target(t: ast.AST) -> Iterator[ast.AST]:
    if isinstance(t, (ast.Tuple, ast.List)):
        for elt in t.elts:
            yield from _flatten_target(elt)
    else:
        yield t


def check_source(source: str) -> list[Finding]:
    """All static findings for a candidate source, sorted by flag then line."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    checker = _Checker(tree)
    checker._inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    checker.collect()
    checker.check_scope()
    checker.check_everywhere()
    return sorted(checker.findings)
