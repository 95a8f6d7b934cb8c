"""Does KvtierConnector match a real vLLM release's connector API?

    python conformance.py VLLM_WHEEL

Reads ``vllm/distributed/kv_transfer/kv_connector/v1/base.py`` from the released wheel
(parsed, never imported: no torch needed) and checks that:

- every abstract method of ``KVConnectorBase_V1`` and ``SupportsHMA`` is implemented by
  ``kvtier.connector.KvtierConnector``;
- every method the connector defines that the base also defines takes the same parameters
  (names, order, ``*args``/``**kwargs``), ``__init__`` and classmethods included (vLLM's
  factory passes ``kv_cache_config`` by keyword);
- the test stand-in of the base module declares exactly the release's abstract methods, with
  the same parameters, so the other tests exercise the real contract;
- every method of the other release classes kvtier extends (``KVConnectorStats``,
  ``KVConnectorPromMetrics``, ``KVConnectorWorkerMetadata``) is defined by the kvtier class
  with the same parameters, and by the stand-in too.

Exits 1 with every difference listed.
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
        standin = getattr(importlib.import_module(module[:-3].replace("/", ".")), cls)
        for name, (params, varargs, varkw, _) in methods.items():
            checked += 1
            want = (params, varargs, varkw)
            if name not in vars(mine):
                problems.append(f"{mine_name} does not define {cls}.{name}")
            elif live_params(getattr(mine, name)) != want:
                problems.append(f"{mine_name}.{name}: release takes {want}, kvtier takes "
                                f"{live_params(getattr(mine, name))}")
            theirs = getattr(standin, name, None)
            if theirs is None or live_params(theirs) != want:
                problems.append(f"stand-in {cls}.{name} differs from the release")
    return checked


def main():
    wheel = sys.argv[1]
    with zipfile.ZipFile(wheel) as z:
        source = z.read(BASE).decode()
        metrics_source = z.read(METRICS).decode()
    release = release_methods(source)
    missing = [c for c in CLASSES if c not in release]
    if missing:
        print(f"{wheel}: {BASE} has no {missing}")
        return 1

    from kvtier.connector import KvtierConnector
    from vllm.distributed.kv_transfer.kv_connector.v1 import base as standin

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
            # The stand-in must declare the same abstract methods with the same parameters.
            s = getattr(standin, cls)
            if abstract:
                if name not in getattr(s, "__abstractmethods__", ()):
                    problems.append(f"stand-in {cls}.{name} is not abstract as in the release")
                elif live_params(getattr(s, name))[0] != params:
                    problems.append(f"stand-in {cls}.{name} parameters differ from the release")
        s_abstract = set(getattr(getattr(standin, cls), "__abstractmethods__", ()))
        r_abstract = {n for n, m in methods.items() if m[3]}
        if s_abstract != r_abstract:
            problems.append(f"stand-in {cls} abstract methods {sorted(s_abstract)} != release "
                            f"{sorted(r_abstract)}")
    if inspect.isabstract(KvtierConnector):
        problems.append(f"KvtierConnector is still abstract: {KvtierConnector.__abstractmethods__}")

    checked = sum(len(m) for m in release.values())
    checked += check_extended({BASE: source, METRICS: metrics_source}, problems)
    if problems:
        print(f"{len(problems)} differences against {wheel}:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"KvtierConnector conforms to {wheel.rsplit('/', 1)[-1]} ({checked} methods checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
