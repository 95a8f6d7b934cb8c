"""Does KvtierConnector match a vLLM release's connector API?

    python conformance.py VLLM_WHEEL [VLLM_WHEEL ...]

Reads ``vllm/distributed/kv_transfer/kv_connector/v1/base.py`` (and ``metrics.py``) from each
released wheel (parsed, never imported: a GPU release's wheel cannot run here) and checks that:

- every abstract method of ``KVConnectorBase_V1`` and ``SupportsHMA`` is implemented by
  ``kvtier.connector.KvtierConnector``;
- every method the connector defines that the base also defines takes the same parameters
  (names, order, ``*args``/``**kwargs``), ``__init__`` and classmethods included (vLLM's
  factory passes ``kv_cache_config`` by keyword);
- the other release classes kvtier extends (``KVConnectorStats``, ``KVConnectorPromMetrics``,
  ``KVConnectorWorkerMetadata``): their abstract methods are implemented, and every method
  the kvtier class defines takes the release's parameters.

Run with the vLLM the tests run against installed (``kvtier.connector`` imports its base
classes). Exits 1 with every difference listed.
"""

import ast
import inspect
import sys
import zipfile

BASE = "vllm/distributed/kv_transfer/kv_connector/v1/base.py"
CLASSES = ("KVConnectorBase_V1", "SupportsHMA")
METRICS = "vllm/distributed/kv_transfer/kv_connector/v1/metrics.py"
# (release module, class) -> the kvtier class that extends it, and where the stand-in is.
EXTENDED = {
    (METRICS, "KVConnectorStats"): "kvtier.stats.KvtierStats",
    (METRICS, "KVConnectorPromMetrics"): "kvtier.stats.KvtierPromMetrics",
    (BASE, "KVConnectorWorkerMetadata"): "kvtier.connector.KvtierWorkerMeta",
}


def release_methods(source, classes=CLASSES):
    """{class: {method: (params, has_varargs, has_varkw, abstract)}} from base.py's source."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name in classes:
            methods = {}
            for f in node.body:
                if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                decos = {getattr(d, "id", getattr(d, "attr", "")) for d in f.decorator_list}
                if "property" in decos:
                    continue
                a = f.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
                methods[f.name] = (params, a.vararg is not None, a.kwarg is not None,
                                   "abstractmethod" in decos)
            out[node.name] = methods
    return out


def live_params(func):
    sig = inspect.signature(func)
    params, varargs, varkw = [], False, False
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            varargs = True
        elif p.kind == p.VAR_KEYWORD:
            varkw = True
        else:
            params.append(p.name)
    return params, varargs, varkw


def check_extended(sources, problems):
    """The classes kvtier extends against the release's; returns methods checked."""
    import importlib

    checked = 0
    for (module, cls), mine_path in EXTENDED.items():
        methods = release_methods(sources[module], (cls,)).get(cls)
        if not methods:
            problems.append(f"{module} has no {cls}")
            continue
        mod, _, mine_name = mine_path.rpartition(".")
        mine = getattr(importlib.import_module(mod), mine_name)
        for name, (params, varargs, varkw, abstract) in methods.items():
            checked += 1
            want = (params, varargs, varkw)
            if name not in vars(mine):
                if abstract:
                    problems.append(f"{mine_name} does not implement abstract {cls}.{name}")
            elif live_params(getattr(mine, name)) != want:
                problems.append(f"{mine_name}.{name}: release takes {want}, kvtier takes "
                                f"{live_params(getattr(mine, name))}")
    return checked


def check(wheel):
    """Differences against one wheel, and the number of methods checked."""
    with zipfile.ZipFile(wheel) as z:
        source = z.read(BASE).decode()
        metrics_source = z.read(METRICS).decode()
    release = release_methods(source)
    missing = [c for c in CLASSES if c not in release]
    if missing:
        return [f"{BASE} has no {missing}"], 0

    from kvtier.connector import KvtierConnector

    problems = []
    own = vars(KvtierConnector)
    for cls, methods in release.items():
        for name, (params, varargs, varkw, abstract) in methods.items():
            if abstract and name not in own:
                problems.append(f"{cls}.{name} is abstract in the release and not implemented")
            mine = own.get(name)
            if isinstance(mine, classmethod):
                mine = mine.__func__
            if mine is not None and callable(mine):
                got = live_params(mine)
                if got != (params, varargs, varkw):
                    problems.append(f"{name}: release takes {params} (*{varargs}, **{varkw}), "
                                    f"connector takes {got[0]} (*{got[1]}, **{got[2]})")
    if inspect.isabstract(KvtierConnector):
        problems.append(f"KvtierConnector is still abstract: {KvtierConnector.__abstractmethods__}")
    checked = sum(len(m) for m in release.values())
    checked += check_extended({BASE: source, METRICS: metrics_source}, problems)
    return problems, checked


def main():
    failed = 0
    for wheel in sys.argv[1:]:
        name = wheel.rsplit("/", 1)[-1]
        problems, checked = check(wheel)
        if problems:
            failed += 1
            print(f"{len(problems)} differences against {name}:")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"KvtierConnector conforms to {name} ({checked} methods checked)")
    return 1 if failed or len(sys.argv) < 2 else 0


if __name__ == "__main__":
    sys.exit(main())
