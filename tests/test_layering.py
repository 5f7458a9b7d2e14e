"""The layering holds: no module of backend/ imports one that imports it back (directly or through
others), and nothing in backend/ imports Triton's Python-backend utilities."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def backend_imports() -> dict[str, set[str]]:
    """module name -> the backend modules it imports anywhere in its file (function bodies too)."""
    graph = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "backend")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            deps = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    deps.add(node.module)
                    deps.update(f"{node.module}.{a.name}" for a in node.names)
            graph[module] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def find_cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_backend_has_no_import_cycle():
    graph = backend_imports()
    assert "backend.core" in graph and "backend.model_runner" in graph["backend.core"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_backend_does_not_import_triton_glue():
    for module, deps in backend_imports().items():
        path = os.path.join(ROOT, *module.split(".")) + ".py"
        if not os.path.exists(path):
            path = os.path.join(ROOT, *module.split("."), "__init__.py")
        assert "triton_python_backend_utils" not in open(path).read(), module


def test_the_openai_front_holds_no_engine():
    """entrypoints/ speaks to the server over gRPC only: it imports neither the engine nor torch (a
    front process that stays small and starts at once); of backend/, only the tokenizer (HF
    `tokenizers`), for /tokenize."""
    folder = os.path.join(ROOT, "entrypoints")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(folder, name)).read())
            modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            roots = {m.split(".")[0] for m in modules - {"backend.tokenizer"}}
            assert not roots & {"backend", "kernels", "torch", "triton_glue", "transformers"}, (name, roots)
