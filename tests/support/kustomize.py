"""`kubectl kustomize` for the subset compose/kubernetes/ uses, in Python (no kubectl here): a kustomization's
`resources` (files, and directories holding a kustomization), `namespace`, and `patches` given by `path`
(strategic-merge patches whose target is the patch's own kind and name). Merging follows Kubernetes'
strategic merge for what the manifests hold: maps merge key by key; the lists with a merge key in the
Kubernetes API (`MERGE_KEYS`: containers, env, volumes on `name`, volumeMounts on `mountPath`, ports on
`containerPort`) merge item by item on it; any other list (args, tolerations) and any scalar is replaced. Anything else in a kustomization is refused, so a manifest never relies on a feature this renderer
would silently skip."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "patches"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass"}


class KustomizeError(ValueError):
    pass


def build(directory: Path) -> list[dict[str, Any]]:
    """The resources `kubectl kustomize <directory>` prints, in order."""
    directory = Path(directory)
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}/kustomization.yaml: {sorted(unknown)} not supported by this renderer")
    out: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        out += build(path) if path.is_dir() else load(path)
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{directory}: only `patches: - path: <file>` is supported, not {patch}")
        for doc in load(directory / patch["path"]):
            target = _find(out, doc["kind"], doc["metadata"]["name"], directory / patch["path"])
            out[out.index(target)] = merge(target, doc)
    if "namespace" in spec:
        for res in out:
            if res["kind"] == "Namespace":
                continue
            if res["kind"] not in CLUSTER_SCOPED:
                res.setdefault("metadata", {})["namespace"] = spec["namespace"]
    return out


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def _find(resources: list[dict[str, Any]], kind: str, name: str, where: Path) -> dict[str, Any]:
    hits = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    if len(hits) != 1:
        raise KustomizeError(f"{where}: patch target {kind}/{name} matches {len(hits)} resources")
    return hits[0]


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of `patch` into a copy of `base` (`field`: the key both sit under; see the module)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            out[k] = merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    key = MERGE_KEYS.get(field)
    if key and isinstance(base, list) and isinstance(patch, list):
        out = copy.deepcopy(base)
        for item in patch:
            at = next((i for i, have in enumerate(out) if have.get(key) == item[key]), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = merge(out[at], item)
        return out
    return copy.deepcopy(patch)
