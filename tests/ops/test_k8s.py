"""ops/k8s: the Kubernetes manifests, rendered as kustomize would, validated offline, and held to
the code they deploy.

- Rendering: `render()` redoes `kustomize build` for the features ops/k8s uses (resources,
  namespace, images, replicas, configMapGenerator with kustomize's name hash, JSON 6902 patches)
  and refuses any other, so no kustomization can use something these tests do not see. Where
  kubectl is installed its output is compared with kubectl's own kustomize.
- Schemas: every object against Kubernetes' OpenAPI schemas (kubernetes-validate, strict: an
  unknown field fails), for the oldest and the newest Kubernetes we support. KEDA's objects are
  custom resources that no installed package describes, so KEDA_SCHEMAS spells out their fields
  from KEDA's ScaledObject specification (unknown fields refused too), with Kubernetes' own
  definitions for the parts that are Kubernetes types (metadata, the HPA behavior).
- Drift: queue names, node names, ports, probe paths, environment variables, commands, grace
  periods and the configuration are read from the code, so a change on either side fails a
  check; `test_a_broken_copy_fails` breaks a copy of ops/k8s on purpose and sees each check fail.
- Live: the pods' commands, run here as the manifests give them (environment, mounts, probes)
  against this session's Redis and PostgreSQL: the migrate Job and the pods that wait for it, the
  worker probes, the SQLite writer with `sluice serve` beside it.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "ops" / "k8s"

Doc = dict[str, Any]


# --- Rendering: `kustomize build`, for the features ops/k8s uses ---------------------------------


class RenderError(Exception):
    """A kustomization this renderer cannot build exactly as kustomize would."""


KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "replicas",
    "configMapGenerator",
    "patches",
}
_GENERATED = "__generated__"  # marks a generated ConfigMap until its name gets the hash
_WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


def render(folder: Path) -> list[Doc]:
    """The objects `kustomize build folder` prints."""
    docs = _build(folder.resolve())
    renamed: dict[str, str] = {}
    for doc in docs:
        if doc.pop(_GENERATED, False):
            name = doc["metadata"]["name"]
            renamed[name] = doc["metadata"]["name"] = f"{name}-{configmap_hash(doc)}"
    for doc in docs:
        spec = pod_spec(doc)
        if spec is not None:
            _rename_configmap_refs(spec, renamed)
    return docs


def configmap_hash(doc: Doc) -> str:
    """kustomize's suffix for a generated ConfigMap: the sha256 of Go's JSON of its kind, name and
    data (keys sorted, `<>&` escaped), the first 10 hex digits with 0 1 3 a e spelt g h k m t. The
    name enters as "": kustomize looks it up as one key named "metadata/name", never there."""
    text = json.dumps(
        {"kind": "ConfigMap", "name": "", "data": doc.get("data", {})},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char in "&<>\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return hashlib.sha256(text.encode()).hexdigest()[:10].translate(str.maketrans("013ae", "ghkmt"))


def pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] in _WORKLOADS:
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    return None


def containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _load_all(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _build(folder: Path) -> list[Doc]:
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_FIELDS
    if unknown or k.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{folder}: {sorted(unknown) or k['kind']} is not implemented here")
    docs: list[Doc] = []
    for entry in k.get("resources", []):
        path = folder / entry
        docs += _build(path.resolve()) if path.is_dir() else _load_all(path)
    for generator in k.get("configMapGenerator", []):
        _generate(folder, generator, docs)
    for patch in k.get("patches", []):
        _patch(folder, patch, docs)
    for doc in docs:
        if "namespace" in k:
            doc["metadata"]["namespace"] = k["namespace"]
    for entry in k.get("replicas", []):
        _only(entry, {"name", "count"}, folder)
        found = [
            d for d in docs if d["kind"] in _WORKLOADS and d["metadata"]["name"] == entry["name"]
        ]
        if not found:
            raise RenderError(f"{folder}: replicas of {entry['name']}, which is not here")
        for doc in found:
            doc["spec"]["replicas"] = int(entry["count"])
    for entry in k.get("images", []):
        _only(entry, {"name", "newName", "newTag", "digest"}, folder)
        for doc in docs:
            for c in containers(pod_spec(doc) or {}):
                name, tag = split_image(c["image"])
                if name == entry["name"]:
                    new = entry.get("newName", name)
                    if "digest" in entry:
                        tag = "@" + entry["digest"]
                    elif "newTag" in entry:
                        tag = ":" + str(entry["newTag"])
                    c["image"] = new + tag
    seen = [(d["kind"], d["metadata"]["name"]) for d in docs]
    if len(seen) != len(set(seen)):
        raise RenderError(f"{folder}: the same object twice: {seen}")
    return docs


def split_image(image: str) -> tuple[str, str]:
    """("registry/name", ":tag" or "@digest" or "")."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    name, colon, tag = image.rpartition(":")
    if colon and "/" not in tag:
        return name, ":" + tag
    return image, ""


def _only(entry: Doc, allowed: set[str], folder: Path) -> None:
    if set(entry) - allowed:
        raise RenderError(f"{folder}: {sorted(set(entry) - allowed)} is not implemented here")


def _generate(folder: Path, generator: Doc, docs: list[Doc]) -> None:
    _only(generator, {"name", "files", "behavior"}, folder)
    name, behavior = generator["name"], generator.get("behavior", "create")
    data = {}
    for entry in generator.get("files", []):
        key, _, path = str(entry).rpartition("=")
        data[key or Path(path).name] = (folder / path).read_text()
    same = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    if behavior == "create" and not same:
        docs.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
            | {_GENERATED: True}
        )
    elif behavior in ("replace", "merge") and len(same) == 1 and same[0].get(_GENERATED):
        same[0]["data"] = data if behavior == "replace" else {**same[0]["data"], **data}
    else:
        raise RenderError(f"{folder}: configMapGenerator {name} with behavior {behavior}")


def _patch(folder: Path, entry: Doc, docs: list[Doc]) -> None:
    _only(entry, {"target", "patch", "path"}, folder)
    _only(entry["target"], {"kind", "name"}, folder)
    ops = yaml.safe_load(
        entry["patch"] if "patch" in entry else (folder / entry["path"]).read_text()
    )
    if not isinstance(ops, list):
        raise RenderError(
            f"{folder}: only JSON 6902 patches (a list of operations) are implemented"
        )
    kind, name = entry["target"]["kind"], entry["target"]["name"]
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if not found:
        raise RenderError(f"{folder}: a patch of {kind} {name}, which is not here")
    for doc in found:
        for op in ops:
            _apply(doc, op, folder)


def _apply(doc: Doc, op: Doc, folder: Path) -> None:
    """One JSON Patch (RFC 6902) operation: add, remove, replace or test."""
    *parents, last = [
        p.replace("~1", "/").replace("~0", "~") for p in str(op["path"]).split("/")[1:]
    ]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
            return
        if not 0 <= index < len(node):
            raise RenderError(f"{folder}: {op['path']} does not exist")
        key: int | str = index
    else:
        if kind == "add":
            node[last] = copy.deepcopy(op["value"])
            return
        if last not in node:
            raise RenderError(f"{folder}: {op['path']} does not exist")
        key = last
    if kind == "replace":
        node[key] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[key]
    elif kind == "test":
        if node[key] != op["value"]:
            raise RenderError(f"{folder}: test of {op['path']} failed: {node[key]!r}")
    else:
        raise RenderError(f"{folder}: JSON patch operation {kind!r} is not implemented here")


def _rename_configmap_refs(spec: Doc, renamed: dict[str, str]) -> None:
    def rename(ref: Doc | None) -> None:
        if ref and ref.get("name") in renamed:
            ref["name"] = renamed[ref["name"]]

    for volume in spec.get("volumes", []):
        rename(volume.get("configMap"))
        for source in volume.get("projected", {}).get("sources", []):
            rename(source.get("configMap"))
    for c in containers(spec):
        for var in c.get("env", []):
            rename(var.get("valueFrom", {}).get("configMapKeyRef"))
        for source in c.get("envFrom", []):
            rename(source.get("configMapRef"))


KUSTOMIZATIONS = sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))


def _key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_render_matches_kubectl_kustomize(folder: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer is not compared with kustomize")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    theirs = {_key(d): d for d in yaml.safe_load_all(out.stdout) if d}
    ours = {_key(d): d for d in render(K8S / folder)}
    assert sorted(ours) == sorted(theirs)
    for key, doc in ours.items():
        assert doc == theirs[key], key


# --- What the code says: the CLI, queues, env names, serve's paths, the probes --------------------

SECRET = "sluice-secrets"
API_KEYS_SECRET = "sluice-api-keys"
PROBES = "sluice-probes"  # the ConfigMap of ops/k8s/base/probes/, mounted at /probes
DEPLOYABLE = {
    "base": ("base",),
    "base+keda": ("base", "autoscaling/keda"),
    "base+hpa": ("base", "autoscaling/hpa"),
    "example": ("overlays/example",),
}
VERSIONS = ("1.31", "1.37")  # the oldest and newest Kubernetes the manifests are checked against


def rendered(*folders: str, root: Path = K8S) -> list[Doc]:
    return [doc for folder in folders for doc in render(root / folder)]


def parse_sluice(argv: list[str]) -> dict[str, Any]:
    """The options `sluice argv` runs with, as the CLI parses them; AssertionError if it would
    refuse them. Works with the click CLI (ops/cli.py `cli`) and the argparse one before it."""
    from sluice.ops import cli as module

    group = getattr(module, "cli", None)
    if group is None:
        try:
            return vars(module.build_parser().parse_args(argv))
        except SystemExit as exc:
            raise AssertionError(f"`sluice {' '.join(argv)}` is refused") from exc
    import click

    ctx = group.make_context("sluice", [], resilient_parsing=True)
    rest = list(argv)
    try:
        while True:
            name, command, rest = group.resolve_command(ctx, rest)
            assert name is not None and command is not None, f"no command in {argv}"
            if not isinstance(command, click.Group):
                params: dict[str, Any] = command.make_context(name, rest, parent=ctx).params
                return params
            ctx = command.make_context(name, [], parent=ctx, resilient_parsing=True)
            group = command
    except click.ClickException as exc:
        raise AssertionError(f"`sluice {' '.join(argv)}` is refused: {exc}") from exc


def code_env_names() -> set[str]:
    """Every SLUICE_* name the code mentions, and the token variable the D1 settings default to."""
    from sluice.shared.settings import D1SinkConfig

    names = {str(D1SinkConfig.model_fields["api_token_env"].default)}
    for folder in ("shared", "producers", "consumers", "ops"):
        for path in (ROOT / folder).rglob("*.py"):
            if K8S not in path.parents:
                names |= set(re.findall(r"\b(SLUICE_[A-Z0-9_]+)\b", path.read_text()))
    return names


def serve_paths() -> set[str]:
    """The paths ops/serve.py answers (its string literals that are URL paths)."""
    return set(re.findall(r"\"(/[a-z_]*)\"", (ROOT / "ops" / "serve.py").read_text()))


def probe_script(name: str) -> dict[str, Any]:
    import runpy

    return runpy.run_path(str(K8S / "base" / "probes" / name))


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if pod_spec(d) is not None]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def sluice_containers(docs: list[Doc]) -> list[tuple[Doc, Doc]]:
    """(workload, container) for every container that runs the `sluice` entrypoint."""
    return [
        (w, c) for w in workloads(docs) for c in containers(pod_spec(w) or {}) if "command" not in c
    ]


def worker_roles(docs: list[Doc]) -> dict[str, tuple[Doc, Doc, dict[str, Any]]]:
    """role (the name half of --hostname) → (workload, container, its parsed options)."""
    roles: dict[str, tuple[Doc, Doc, dict[str, Any]]] = {}
    for w, c in sluice_containers(docs):
        if c.get("args", [None])[0] == "worker":
            opts = parse_sluice(c["args"])
            hostname = opts.get("hostname") or ""
            assert re.fullmatch(r"[a-z0-9-]+@%h", hostname), (
                f"{w['metadata']['name']}: --hostname must be ROLE@%h, got {hostname!r}"
            )
            role = hostname.split("@")[0]
            assert role not in roles, f"two workers named {role}@%h"
            roles[role] = (w, c, opts)
    return roles


def replicas(doc: Doc) -> int:
    return int(doc["spec"].get("replicas", 1))


def env_of(c: Doc) -> dict[str, Doc]:
    return {var["name"]: var for var in c.get("env", [])}


def config_text(docs: list[Doc]) -> str:
    maps = [
        d
        for d in docs
        if d["kind"] == "ConfigMap"
        and re.fullmatch(r"sluice-config(-[a-z0-9]{10})?", d["metadata"]["name"])
    ]
    assert len(maps) == 1, "one ConfigMap sluice-config holds sluice.toml"
    text: str = maps[0]["data"]["sluice.toml"]
    return text


def settings_of(docs: list[Doc], tmp: Path) -> Any:
    from sluice.shared.settings import Settings

    path = tmp / "sluice.toml"
    path.write_text(config_text(docs))
    env = {
        "SLUICE_CONFIG": str(path),
        "SLUICE_BROKER_URL": "redis://redis:6379/0",
        "SLUICE_POSTGRES_URL": "postgresql://sluice@postgres/sluice",
    }
    return Settings.load(env)


# --- Checks: each raises AssertionError naming what drifted ---------------------------------------

KEDA_API = "keda.sh/v1alpha1"
# The redis trigger's metadata keys, as KEDA documents its Redis Lists scaler.
KEDA_REDIS_KEYS = {
    "address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv", "usernameFromEnv",
    "passwordFromEnv", "listName", "listLength", "activationListLength", "databaseIndex",
    "enableTLS", "unsafeSsl",
}  # fmt: skip
_K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"


def _obj(properties: Doc, required: tuple[str, ...] = ()) -> Doc:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_INT = {"type": "integer"}
_STR = {"type": "string"}
_METADATA = {"$ref": _K8S_DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
# KEDA's ScaledObject and TriggerAuthentication (keda.sh/v1alpha1), field by field as KEDA's
# specification gives them; an unknown field is an error, as kubectl's strict field validation
# makes it. advanced.horizontalPodAutoscalerConfig.behavior is Kubernetes' own HPA behavior.
KEDA_SCHEMAS: dict[str, Doc] = {
    "ScaledObject": _obj(
        {
            "apiVersion": {"const": KEDA_API},
            "kind": {"const": "ScaledObject"},
            "metadata": _METADATA,
            "spec": _obj(
                {
                    "scaleTargetRef": _obj(
                        {
                            "apiVersion": _STR,
                            "kind": _STR,
                            "name": _STR,
                            "envSourceContainerName": _STR,
                        },
                        ("name",),
                    ),
                    "pollingInterval": _INT,
                    "cooldownPeriod": _INT,
                    "initialCooldownPeriod": _INT,
                    "idleReplicaCount": _INT,
                    "minReplicaCount": _INT,
                    "maxReplicaCount": _INT,
                    "fallback": _obj(
                        {
                            "failureThreshold": _INT,
                            "replicas": _INT,
                            "behavior": {
                                "enum": [
                                    "static",
                                    "currentReplicas",
                                    "currentReplicasIfHigher",
                                    "currentReplicasIfLower",
                                ]
                            },
                        },
                        ("failureThreshold", "replicas"),
                    ),
                    "advanced": _obj(
                        {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "horizontalPodAutoscalerConfig": _obj(
                                {
                                    "name": _STR,
                                    "behavior": {
                                        "$ref": _K8S_DEFS
                                        + "io.k8s.api.autoscaling.v2."
                                        + "HorizontalPodAutoscalerBehavior"
                                    },
                                }
                            ),
                            "scalingModifiers": _obj(
                                {
                                    "formula": _STR,
                                    "target": _STR,
                                    "activationTarget": _STR,
                                    "metricType": _STR,
                                }
                            ),
                        }
                    ),
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": _obj(
                            {
                                "type": _STR,
                                "name": _STR,
                                "metadata": {"type": "object", "additionalProperties": _STR},
                                "authenticationRef": _obj(
                                    {
                                        "name": _STR,
                                        "kind": {
                                            "enum": [
                                                "TriggerAuthentication",
                                                "ClusterTriggerAuthentication",
                                            ]
                                        },
                                    },
                                    ("name",),
                                ),
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "useCachedMetrics": {"type": "boolean"},
                            },
                            ("type", "metadata"),
                        ),
                    },
                },
                ("scaleTargetRef", "triggers"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    "TriggerAuthentication": _obj(
        {
            "apiVersion": {"const": KEDA_API},
            "kind": {"const": "TriggerAuthentication"},
            "metadata": _METADATA,
            "spec": _obj(
                {
                    "secretTargetRef": {
                        "type": "array",
                        "items": _obj(
                            {"parameter": _STR, "name": _STR, "key": _STR},
                            ("parameter", "name", "key"),
                        ),
                    },
                    "configMapTargetRef": {
                        "type": "array",
                        "items": _obj(
                            {"parameter": _STR, "name": _STR, "key": _STR},
                            ("parameter", "name", "key"),
                        ),
                    },
                    "env": {
                        "type": "array",
                        "items": _obj(
                            {"parameter": _STR, "name": _STR, "containerName": _STR},
                            ("parameter", "name"),
                        ),
                    },
                    **{
                        provider: {"type": "object"}
                        for provider in (
                            "podIdentity",
                            "hashiCorpVault",
                            "azureKeyVault",
                            "awsSecretManager",
                            "gcpSecretManager",
                            "boundServiceAccountToken",
                        )
                    },
                }
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
}
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def check_schemas(docs: list[Doc], version: str) -> None:
    """Kubernetes' schemas (strict) for the built-in kinds, KEDA_SCHEMAS for KEDA's, and the
    quantities of requests, limits and volume sizes (the schemas take any string there)."""
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    for doc in docs:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        if doc["apiVersion"] == KEDA_API:
            assert doc["kind"] in KEDA_SCHEMAS, f"{where}: no schema here for this KEDA kind"
            definitions = kubernetes_validate.utils.schema_contents(
                f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json", version
            )
            registry: Registry[Any] = Resource.from_contents(definitions) @ Registry()
            validator = jsonschema.Draft202012Validator(
                KEDA_SCHEMAS[doc["kind"]], registry=registry
            )
            errors = [
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)
            ]
            assert not errors, f"{where} (KEDA): {errors}"
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(f"{where} (Kubernetes {version}): {path}: {exc.message}") from None
    for w in workloads(docs):
        for c in containers(pod_spec(w) or {}):
            for group in ("requests", "limits"):
                for resource, value in c.get("resources", {}).get(group, {}).items():
                    assert QUANTITY.match(str(value)), f"{c['name']}: {group}.{resource} {value!r}"
        for claim in w["spec"].get("volumeClaimTemplates", []):
            size = claim["spec"]["resources"]["requests"]["storage"]
            assert QUANTITY.match(str(size)), f"{w['metadata']['name']}: storage {size!r}"


def check_wiring(docs: list[Doc]) -> None:
    """Selectors, Services, PDBs, volumes and ConfigMaps point at what is there; one image."""
    pods = {
        w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)
    }

    def matching(selector: dict[str, str]) -> list[str]:
        return [name for name, labels in pods.items() if selector.items() <= labels.items()]

    for w in workloads(docs):
        name = w["metadata"]["name"]
        if w["kind"] != "Job":
            selector = w["spec"]["selector"]["matchLabels"]
            assert matching(selector) == [name], (
                f"{name}: its selector matches {matching(selector)}"
            )
        spec = pod_spec(w) or {}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in w["spec"].get("volumeClaimTemplates", [])}
        configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, (
                    f"{name}: no ConfigMap {v['configMap']}"
                )
        for c in containers(spec):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, (
                    f"{name}/{c['name']}: mounts {mount['name']}, which the pod does not have"
                )
    images = {c["image"] for w in workloads(docs) for c in containers(pod_spec(w) or {})}
    assert len(images) == 1, f"every container runs the one Sluice image, not {sorted(images)}"
    for doc in docs:
        if doc["kind"] == "Service":
            found = matching(doc["spec"]["selector"])
            assert len(found) == 1, f"Service {doc['metadata']['name']} selects {found}"
            target = next(w for w in workloads(docs) if w["metadata"]["name"] == found[0])
            ports = {
                p.get("name")
                for c in containers(pod_spec(target) or {})
                for p in c.get("ports", [])
            }
            for port in doc["spec"].get("ports", []):
                assert port["targetPort"] in ports, (
                    f"Service {doc['metadata']['name']}: no container port {port['targetPort']}"
                )
        if doc["kind"] == "PodDisruptionBudget":
            found = matching(doc["spec"]["selector"]["matchLabels"])
            assert len(found) == 1, f"PDB {doc['metadata']['name']} selects {found}"
            assert doc["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", (
                f"PDB {doc['metadata']['name']}: a pod that is not ready must not block drains"
            )


def check_commands(docs: list[Doc]) -> None:
    """Every container runs the image's `sluice` with arguments the CLI accepts, or one of the
    probe scripts from the sluice-probes ConfigMap mounted at /probes."""
    scripts = {name for name in (K8S / "base" / "probes").iterdir() if name.suffix == ".py"}
    for w in workloads(docs):
        spec = pod_spec(w) or {}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(spec):
            where = f"{w['metadata']['name']}/{c['name']}"
            if "command" not in c:
                parse_sluice(c.get("args", []))
                continue
            assert c["command"][0] == "python" and len(c["command"]) == 2, where
            script = Path(c["command"][1])
            assert script.parent == Path("/probes") and script.name in {s.name for s in scripts}, (
                f"{where}: runs {script}, not a script of ops/k8s/base/probes"
            )
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            volume = volumes.get(mounts.get("/probes", ""), {})
            assert volume.get("configMap", {}).get("name", "").startswith(PROBES), (
                f"{where}: /probes must be the {PROBES} ConfigMap"
            )
    for probe in ("worker_probe.py", "wait_for_schema.py"):
        in_map = [d for d in docs if d["kind"] == "ConfigMap" and probe in d.get("data", {})]
        if in_map:
            assert in_map[0]["data"][probe] == (K8S / "base" / "probes" / probe).read_text()


def check_queues(docs: list[Doc]) -> None:
    """The worker roles consume exactly the code's queues: PostgreSQL as compose's `worker`,
    the SQLite writer alone on its queue, the remote D1 writer on its own."""
    from sluice.shared.celery_app import QUEUES, ingest_queue

    roles = worker_roles(docs)
    queues = {role: set((opts["queues"] or "").split(",")) for role, (_, _, opts) in roles.items()}
    expected = {
        "postgres": {ingest_queue("postgres"), "dead_letter", "progress", "produce"},
        "sqlite": {ingest_queue("sqlite")},
        "d1": {ingest_queue("d1")},
    }
    assert queues == expected, f"worker roles and their queues: {queues}, expected {expected}"
    from sluice.ops.workers import role_for_queues

    for role, on in queues.items():  # the name `sluice worker` gives a worker of these queues
        named = role_for_queues(sorted(on))
        assert role == named, f"{role}@%h consumes {sorted(on)}: sluice worker names it {named}@%h"
    consumed = set().union(*queues.values())
    assert consumed == set(QUEUES), f"queues nobody consumes: {set(QUEUES) - consumed}"


def check_sqlite_writer(docs: list[Doc]) -> None:
    """One SQLite writer: a StatefulSet of one replica, the threads pool at the size the sink
    commits in groups for, its file on the pod's own ReadWriteOnce volume."""
    from sluice.shared.sinks.sqlite import WRITER_THREADS

    w, _, opts = worker_roles(docs)["sqlite"]
    name = w["metadata"]["name"]
    assert w["kind"] == "StatefulSet" and replicas(w) == 1, f"{name}: one StatefulSet replica"
    assert opts["pool"] == "threads" and opts["concurrency"] == WRITER_THREADS, (
        f"{name}: --pool threads --concurrency {WRITER_THREADS}, not {opts}"
    )
    claims = {t["metadata"]["name"]: t for t in w["spec"]["volumeClaimTemplates"]}
    for claim in claims.values():
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], name
    for other in workloads(docs):
        for x in containers(pod_spec(other) or {}):
            path = env_of(x).get("SLUICE_SQLITE_PATH", {}).get("value")
            if path is None:
                continue
            assert other is w, f"{other['metadata']['name']}/{x['name']} opens the SQLite file"
            mounts = {m["mountPath"]: m["name"] for m in x.get("volumeMounts", [])}
            on = [m for m in mounts if Path(path).parent == Path(m)]
            assert on and mounts[on[0]] in claims, (
                f"{name}/{x['name']}: SLUICE_SQLITE_PATH {path} is not on the writer's volume"
            )


def check_probes(docs: list[Doc]) -> None:
    """Worker probes ping the worker's own node (its --hostname) through probes/worker_probe.py;
    serve's probes ask paths ops/serve.py answers, Flower's a path Flower serves."""
    ping_seconds = float(probe_script("worker_probe.py")["PING_SECONDS"])
    for w, c, opts in worker_roles(docs).values():
        where = f"{w['metadata']['name']}/{c['name']}"
        node = opts["hostname"]
        for kind, extra in (
            ("startupProbe", []),
            ("readinessProbe", []),
            ("livenessProbe", ["--live"]),
        ):
            probe = c.get(kind)
            assert probe, f"{where}: no {kind}"
            assert probe["exec"]["command"] == [
                "python",
                "/probes/worker_probe.py",
                node,
                *extra,
            ], f"{where}: {kind} must ping {node}: {probe['exec']['command']}"
            assert probe["timeoutSeconds"] > ping_seconds + 5, f"{where}: {kind} times out first"
    paths = serve_paths()
    for w, c in sluice_containers(docs):
        args = c.get("args", [])
        where = f"{w['metadata']['name']}/{c['name']}"
        if args[:1] == ["serve"]:
            ready = c["readinessProbe"]["httpGet"]["path"]
            assert ready == "/health" and "/health" in paths, (
                f"{where}: readinessProbe asks {ready}, serve's health endpoint is /health"
            )
            for kind in ("readinessProbe", "livenessProbe"):
                path = c[kind]["httpGet"]["path"]
                assert path in paths, f"{where}: {kind} asks {path}, which ops/serve.py lacks"
        if args[:1] == ["flower"]:
            import inspect

            import flower.urls

            for kind in ("readinessProbe", "livenessProbe"):
                path = c[kind]["httpGet"]["path"]
                assert f'"{path}"' in inspect.getsource(flower.urls), f"{where}: {path}"


def check_ports(docs: list[Doc]) -> None:
    """`sluice serve` listens on the serve command's default port (the one compose and the docs
    use), on every address, and its container port and Service say the same; Flower likewise."""
    default = parse_sluice(["serve"])["port"]
    for w, c in sluice_containers(docs):
        args = c.get("args", [])
        if args[:1] not in (["serve"], ["flower"]):
            continue
        where = f"{w['metadata']['name']}/{c['name']}"
        opts = parse_sluice(args)
        if args[0] == "serve":
            assert opts["port"] == default, (
                f"{where}: port {opts['port']}, serve's default {default}"
            )
            assert opts["host"] == "0.0.0.0", f"{where}: must listen beyond the pod's loopback"
        else:
            assert opts["address"] == "0.0.0.0", where
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        assert ports == {"http": opts["port"]}, f"{where}: container port {ports}, args {args}"
    serve = named(docs, "Service", "sluice-serve")
    assert serve["spec"]["ports"][0]["port"] == default, "Service sluice-serve: port"
    assert serve["spec"].get("publishNotReadyAddresses") is True, (
        "Service sluice-serve: /metrics must stay reachable while the writer's pod is not ready"
    )
    serving = [w for w, c in sluice_containers(docs) if c.get("args", [])[:1] == ["serve"]]
    assert [w["metadata"]["name"] for w in serving] == [
        worker_roles(docs)["sqlite"][0]["metadata"]["name"]
    ], "sluice serve runs in the SQLite writer's pod (it opens the SQLite file)"


SENSITIVE = re.compile(r"URL|PASSWORD|TOKEN|SECRET|AUTH|KEY")


def documented_secret_keys() -> set[str]:
    """The keys of sluice-secrets that ops/k8s/README.md lists (`key` in its first column)."""
    text = (K8S / "README.md").read_text()
    return set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, re.MULTILINE))


def check_env(docs: list[Doc]) -> None:
    """Only names the code reads; what a process needs is there; secrets come from the Secret."""
    known = code_env_names()
    for w in workloads(docs):
        for c in containers(pod_spec(w) or {}):
            where = f"{w['metadata']['name']}/{c['name']}"
            env = env_of(c)
            unknown = set(env) - known
            assert not unknown, f"{where}: the code reads no {sorted(unknown)}"
            for name, var in env.items():
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if SENSITIVE.search(name) and name != "SLUICE_CONFIG":
                    assert ref and ref["name"] == SECRET, f"{where}: {name} must come from {SECRET}"
            for source in c.get("envFrom", []):
                assert source == {"secretRef": {"name": API_KEYS_SECRET, "optional": True}}, where
    for w, c in sluice_containers(docs):
        where = f"{w['metadata']['name']}/{c['name']}"
        env = env_of(c)
        command, rest = c["args"][0], c["args"][1:]
        needs = {"SLUICE_CONFIG", "SLUICE_DATA_DIR"}
        if command in ("worker", "beat", "serve", "flower"):
            needs.add("SLUICE_BROKER_URL")
        if command in ("worker", "beat", "serve") or (command == "migrate" and "postgres" in rest):
            needs.add("SLUICE_POSTGRES_URL")
        if command == "migrate" and "sqlite" in rest:
            needs.add("SLUICE_SQLITE_PATH")
        if command == "flower":
            needs.add("SLUICE_FLOWER_AUTH")
        assert needs <= set(env), f"{where}: lacks {sorted(needs - set(env))}"
        config = Path(env["SLUICE_CONFIG"]["value"])
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in (pod_spec(w) or {}).get("volumes", [])}
        volume = volumes.get(mounts.get(str(config.parent), ""), {})
        assert volume.get("configMap", {}).get("name", "").startswith("sluice-config"), (
            f"{where}: SLUICE_CONFIG {config} is not in the sluice-config ConfigMap"
        )
    used = {
        ref["key"]
        for w in workloads(docs)
        for c in containers(pod_spec(w) or {})
        for var in c.get("env", [])
        if (ref := var.get("valueFrom", {}).get("secretKeyRef"))
    }
    used |= {
        ref["key"]
        for d in docs
        if d["kind"] == "TriggerAuthentication"
        for ref in d["spec"].get("secretTargetRef", [])
    }
    assert used <= documented_secret_keys(), (
        f"Secret keys the README does not document: {sorted(used - documented_secret_keys())}"
    )


def check_no_secrets(docs: list[Doc]) -> None:
    """No Secret objects and no credentials written into the manifests."""
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by the operator"
    text = yaml.safe_dump_all(docs)
    creds = re.findall(r"\w+://[^\s/:@'\"]*:[^\s/@'\"]+@", text)
    assert not creds, f"credentials in a URL: {creds}"
    for w, c in sluice_containers(docs):
        for name, var in env_of(c).items():
            if "value" in var and SENSITIVE.search(name) and name != "SLUICE_CONFIG":
                raise AssertionError(f"{w['metadata']['name']}/{c['name']}: {name} is written here")


def check_migrations(docs: list[Doc]) -> None:
    """The Job migrates PostgreSQL; every pod that writes waits for that schema first (a missing
    table would dead-letter its pages); the SQLite file is migrated in its own pod, before the
    writer starts."""
    job = named(docs, "Job", "sluice-migrate")
    (c,) = containers(pod_spec(job) or {})
    opts = parse_sluice(c["args"])
    sinks = opts.get("sinks") or opts.get("sink") or ()
    assert c["args"][0] == "migrate" and "postgres" in sinks, f"Job sluice-migrate: {c['args']}"
    assert (pod_spec(job) or {})["restartPolicy"] in ("Never", "OnFailure")
    for w, _, _ in worker_roles(docs).values():
        inits = (pod_spec(w) or {}).get("initContainers", [])
        waits = [i for i in inits if i.get("command") == ["python", "/probes/wait_for_schema.py"]]
        assert waits, f"{w['metadata']['name']}: starts before the schema is there"
        assert "SLUICE_POSTGRES_URL" in env_of(waits[0]), f"{w['metadata']['name']}: wait for what?"
    writer = worker_roles(docs)["sqlite"][0]
    inits = [i.get("args", []) for i in (pod_spec(writer) or {}).get("initContainers", [])]
    assert ["migrate", "--sink", "sqlite"] in inits, "the SQLite file is migrated in its own pod"


def check_grace(docs: list[Doc], settings: Any) -> None:
    """Each worker's grace period outlasts the longest task it runs, so SIGTERM's warm shutdown
    can finish it. No visibility timeout bounds it: a worker keeps renewing the pages it holds
    for as long as its process lives, warm shutdown included (shared/heartbeat.py)."""
    from sluice.shared.settings import D1SinkConfig, _HttpSourceConfig

    http = [s for s in settings.sources.values() if isinstance(s, _HttpSourceConfig)]
    fields = _HttpSourceConfig.model_fields
    longest_run = max(
        [float(fields["max_run_seconds"].default) + float(fields["total_timeout"].default)]
        + [s.max_run_seconds + s.total_timeout for s in http]
    )
    d1 = settings.d1_sink or D1SinkConfig(account_id="x", database_id="x")
    longest = {
        "postgres": longest_run,
        "sqlite": settings.pipeline.sqlite_busy_timeout_ms / 1000 + 30,
        "d1": d1.max_attempts * (d1.connect_timeout + d1.read_timeout),
    }
    for role, (w, _, _) in worker_roles(docs).items():
        grace = (pod_spec(w) or {}).get("terminationGracePeriodSeconds", 30)
        assert grace >= longest[role], (
            f"{w['metadata']['name']}: {grace} s of grace, its longest task takes {longest[role]} s"
        )


def check_beat(docs: list[Doc], settings: Any) -> None:
    """Two beats under the redbeat lock, renewed well within its timeout, and something to run."""
    from sluice.producers.schedule import beat_schedule

    beats = [(w, c) for w, c in sluice_containers(docs) if c["args"][:1] == ["beat"]]
    assert len(beats) == 1, "one beat Deployment"
    w, c = beats[0]
    opts = parse_sluice(c["args"])
    assert opts["lock_timeout"] >= 3 * opts["max_loop_interval"], (
        f"beat: the lock ({opts['lock_timeout']} s) must outlast several renewals"
        f" ({opts['max_loop_interval']} s)"
    )
    assert replicas(w) == 2, "two beats: a standby takes over within --lock-timeout"
    assert beat_schedule(settings), "sluice.toml schedules nothing: `sluice beat` would exit 1"
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    labels = w["spec"]["template"]["metadata"]["labels"]
    assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs), (
        "beat: no PodDisruptionBudget"
    )


def check_config(docs: list[Doc], settings: Any) -> None:
    """sluice.toml suits this layout: the state store in PostgreSQL (the SQLite file is the
    writer pod's alone), a writer for each sink the streams use."""
    from sluice.shared.state import state_kind

    assert state_kind(settings) == "postgres", (
        "sluice.toml: [pipeline] state must be postgres: only the writer's pod can open the file"
    )
    roles = worker_roles(docs)
    used = {sink for stream in settings.streams.values() for sink in stream.sinks}
    if "d1" in used:
        assert settings.d1_sink is not None and replicas(roles["d1"][0]) >= 1, (
            "a stream writes to d1: configure [sinks.d1] and give sluice-worker-d1 a replica"
        )


def check_autoscaling(docs: list[Doc]) -> None:
    """KEDA watches the list Celery fills for the PostgreSQL workers; the autoscaler never takes
    them to zero (they also run the producers); one autoscaler per Deployment."""
    from sluice.shared.celery_app import ingest_queue

    roles = worker_roles(docs)
    w, c, opts = roles["postgres"]
    queues = set(opts["queues"].split(","))
    scaled = [d for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
    targets = [d["spec"]["scaleTargetRef"]["name"] for d in scaled]
    assert len(targets) == len(set(targets)), f"two autoscalers on one Deployment: {targets}"
    for doc in scaled:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        ref = doc["spec"]["scaleTargetRef"]
        assert (ref.get("kind", "Deployment"), ref["name"]) == (w["kind"], w["metadata"]["name"]), (
            where
        )
        assert "replicas" not in w["spec"], f"{w['metadata']['name']}: the autoscaler owns replicas"
        low = doc["spec"].get(
            "minReplicaCount" if doc["kind"] == "ScaledObject" else "minReplicas", 1
        )
        high = doc["spec"].get(
            "maxReplicaCount" if doc["kind"] == "ScaledObject" else "maxReplicas"
        )
        assert low >= 1 and "produce" in queues, f"{where}: at least one worker runs the producers"
        assert high is not None and high >= low, where
        if doc["kind"] == "HorizontalPodAutoscaler":
            assert c["resources"]["requests"].get("cpu"), f"{where}: CPU utilisation of no request"
            continue
        for trigger in doc["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "redis", where
            assert set(meta) <= KEDA_REDIS_KEYS, f"{where}: {sorted(set(meta) - KEDA_REDIS_KEYS)}"
            assert meta["listName"] == ingest_queue("postgres") and meta["listName"] in queues, (
                f"{where}: watches list {meta['listName']!r},"
                f" the workers fill {ingest_queue('postgres')!r}"
            )
            assert int(meta["listLength"]) >= 1 and int(meta.get("databaseIndex", "0")) >= 0, where
            assert re.fullmatch(r"[A-Za-z0-9.-]+:\d+", meta["address"]), f"{where}: host:port"
            auth = trigger.get("authenticationRef", {}).get("name")
            if auth:
                named(docs, "TriggerAuthentication", auth)


# --- Tests ---------------------------------------------------------------------------------------


def test_kustomizations_are_the_ones_checked() -> None:
    assert set(KUSTOMIZATIONS) == {f for folders in DEPLOYABLE.values() for f in folders}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_every_object_validates_against_the_schemas(folder: str, version: str) -> None:
    check_schemas(rendered(folder), version)


def check_all(docs: list[Doc], tmp: Path) -> None:
    """Every check, on the objects of one deployment."""
    settings = settings_of(docs, tmp)
    check_schemas(docs, VERSIONS[-1])
    check_wiring(docs)
    check_commands(docs)
    check_queues(docs)
    check_sqlite_writer(docs)
    check_probes(docs)
    check_ports(docs)
    check_env(docs)
    check_no_secrets(docs)
    check_migrations(docs)
    check_grace(docs, settings)
    check_beat(docs, settings)
    check_config(docs, settings)
    check_autoscaling(docs)


@pytest.mark.parametrize("deployment", DEPLOYABLE)
def test_manifests_match_the_code(deployment: str, tmp_path: Path) -> None:
    check_all(rendered(*DEPLOYABLE[deployment]), tmp_path)


def test_the_example_overlay_sets_image_sizes_and_scaling() -> None:
    base = {_key(d): d for d in rendered("base")}
    docs = rendered("overlays/example")
    name, tag = split_image(next(c["image"] for _, c in sluice_containers(docs)))
    assert "/" in name and tag not in ("", ":latest"), f"a registry image with a tag: {name}{tag}"
    assert {d["metadata"].get("namespace") for d in docs} == {"sluice"}
    scaled = named(docs, "ScaledObject", "sluice-worker-postgres")
    keda = named(rendered("autoscaling/keda"), "ScaledObject", "sluice-worker-postgres")
    assert scaled["spec"] != keda["spec"], "the overlay sets the counts and Redis' address"
    writer = named(docs, "StatefulSet", "sluice-sqlite-writer")
    assert writer != base[_key(writer)], "the overlay sizes the writer and its volume"
    config = config_text(docs)
    assert config == (K8S / "overlays" / "example" / "sluice.toml").read_text()


def test_the_probe_scripts_are_what_the_config_map_holds() -> None:
    docs = rendered("base")
    (probes,) = [d for d in docs if d["metadata"]["name"].startswith(PROBES)]
    for name, text in probes["data"].items():
        assert text == (K8S / "base" / "probes" / name).read_text()


# Each break edits a copy of ops/k8s the way a manifest drifts from the code; the checks must
# fail on it, naming what drifted.
BREAKS = [
    ("base/worker-postgres.yaml", "ingest.postgres,dead_letter", "ingest.pg,dead_letter",
     "worker roles and their queues"),
    ("autoscaling/keda/scaledobject.yaml", "listName: ingest.postgres", "listName: ingest_postgres",
     "watches list 'ingest_postgres'"),
    ("autoscaling/keda/scaledobject.yaml", "minReplicaCount: 1", "minReplicas: 1",
     "'minReplicas' was unexpected"),
    ("base/sqlite-writer.yaml", '"sqlite@%h", "--live"', '"lite@%h", "--live"',
     "livenessProbe must ping sqlite@%h"),
    ("base/beat.yaml", "name: SLUICE_BROKER_URL", "name: SLUICE_BROKER_URI",
     "the code reads no ['SLUICE_BROKER_URI']"),
    ("base/worker-d1.yaml", "- ingest.d1\n", "- ingest.d1\n            - --prefetch\n",
     "No such option '--prefetch'"),
    ("base/sqlite-writer.yaml", '"--port", "9808"', '"--port", "9090"',
     "port 9090, serve's default 9808"),
    ("base/sqlite-writer.yaml", "{path: /health, port: http}", "{path: /healthz, port: http}",
     "readinessProbe asks /healthz"),
    ("base/sqlite-writer.yaml", "  replicas: 1\n", "  replicas: 2\n",
     "one StatefulSet replica"),
    ("base/worker-postgres.yaml", "GracePeriodSeconds: 360", "GracePeriodSeconds: 30",
     "30 s of grace, its longest task takes 360.0 s"),
    ("base/worker-postgres.yaml", "terminationGracePeriodSeconds: 360",
     "terminationGracePeriod: 360", "'terminationGracePeriod' was unexpected"),
    ("base/flower.yaml", "{name: sluice-secrets, key: flower-auth}", "{name: flower, key: auth}",
     "SLUICE_FLOWER_AUTH must come from sluice-secrets"),
    ("base/worker-d1.yaml", "/probes/wait_for_schema.py", "/probes/worker_probe.py",
     "starts before the schema is there"),
    ("overlays/example/sluice.toml", 'state = "postgres"', 'state = "sqlite"',
     "state must be postgres"),
]  # fmt: skip


@pytest.mark.parametrize(("file", "old", "new", "message"), BREAKS)
def test_a_broken_copy_fails(tmp_path: Path, file: str, old: str, new: str, message: str) -> None:
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    check_all(rendered("overlays/example", root=root), tmp_path)  # the copy as it came passes
    path = root / file
    text = path.read_text()
    assert old in text, f"{file} no longer holds {old!r}: update this break"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_all(rendered("overlays/example", root=root), tmp_path)


# --- Live: the pods' commands, run on this machine as the manifests give them ------------------

SLUICE = Path(sys.executable).with_name("sluice")  # the image's entrypoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child, before exec: the kernel kills it if the test process dies."""
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Pod:
    """One pod of the rendered manifests, run here: each volume a folder (a ConfigMap's files
    written into it), each mount path mapped onto its folder, secretKeyRefs answered from
    `secrets`, containers and exec probes as processes, container ports moved to free local
    ports and 0.0.0.0 to the loopback."""

    def __init__(self, docs: list[Doc], name: str, tmp: Path, secrets: dict[str, str]) -> None:
        self.workload = next(w for w in workloads(docs) if w["metadata"]["name"] == name)
        self.spec = pod_spec(self.workload) or {}
        self.tmp, self.secrets = tmp, secrets
        self.procs: list[subprocess.Popen[bytes]] = []
        configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
        claims = [
            {"name": t["metadata"]["name"]}
            for t in self.workload["spec"].get("volumeClaimTemplates", [])
        ]
        self.volumes: dict[str, Path] = {}
        for volume in [*self.spec.get("volumes", []), *claims]:
            folder = tmp / "volumes" / volume["name"]
            folder.mkdir(parents=True)
            if "configMap" in volume:
                for key, text in configmaps[volume["configMap"]["name"]]["data"].items():
                    (folder / key).write_text(text)
            self.volumes[volume["name"]] = folder
        self.ports = {
            p["containerPort"]: free_port()
            for c in containers(self.spec)
            for p in c.get("ports", [])
        }

    def container(self, name: str) -> Doc:
        return next(c for c in containers(self.spec) if c["name"] == name)

    def local(self, c: Doc, text: str) -> str:
        for mount in sorted(c.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
            path = mount["mountPath"]
            if text == path or text.startswith(path + "/"):
                return str(self.volumes[mount["name"]]) + text[len(path) :]
        if text == "0.0.0.0":
            return "127.0.0.1"
        return str(self.ports.get(int(text), text)) if text.isdigit() else text

    def env(self, c: Doc, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        env.pop("CLOUDFLARE_API_TOKEN", None)
        for var in c.get("env", []):
            if "value" in var:
                env[var["name"]] = self.local(c, var["value"])
                continue
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET, var
            if ref["key"] in self.secrets:
                env[var["name"]] = self.secrets[ref["key"]]
            else:
                assert ref.get("optional"), f"{c['name']}: the Secret lacks {ref['key']}"
        return env | overrides

    def argv(self, c: Doc, command: list[str] | None = None) -> list[str]:
        if command is None:
            command = (
                [*c["command"], *c.get("args", [])] if "command" in c else ["sluice", *c["args"]]
            )
        argv = [self.local(c, arg) for arg in command]
        return [{"python": sys.executable, "sluice": str(SLUICE)}.get(argv[0], argv[0]), *argv[1:]]

    def start(self, name: str) -> subprocess.Popen[bytes]:
        c = self.container(name)
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            self.argv(c),
            env=self.env(c),
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def run(self, name: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        c = self.container(name)
        return subprocess.run(
            self.argv(c),
            env=self.env(c),
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def probe(
        self, name: str, kind: str, replace: dict[str, str] | None = None, **env: str
    ) -> tuple[bool, str]:
        """(success, output) of the container's probe of that kind, as the kubelet runs it."""
        c = self.container(name)
        probe = c[kind]
        if "exec" in probe:
            command = [(replace or {}).get(a, a) for a in probe["exec"]["command"]]
            r = subprocess.run(
                self.argv(c, command),
                env=self.env(c, **env),
                cwd=self.tmp,
                capture_output=True,
                text=True,
                timeout=probe["timeoutSeconds"],
            )
            return r.returncode == 0, r.stdout + r.stderr
        get = probe["httpGet"]
        port = next(
            p["containerPort"] for p in c["ports"] if get["port"] in (p["name"], p["containerPort"])
        )
        url = f"http://127.0.0.1:{self.ports[port]}{get['path']}"
        try:
            with urllib.request.urlopen(url, timeout=probe["timeoutSeconds"]) as answer:
                return 200 <= answer.status < 400, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return False, f"{exc.code}: {exc.read().decode()}"
        except OSError as exc:
            return False, str(exc)

    def until(self, name: str, kind: str, seconds: float = 90) -> str:
        """Probe until it succeeds (the startup a kubelet waits for); its last output."""
        deadline = time.monotonic() + seconds
        while True:
            ok, out = self.probe(name, kind)
            if ok:
                return out
            assert time.monotonic() < deadline, f"{name}: {kind} still failing: {out}"
            time.sleep(1)

    def stop(self) -> list[int]:
        """SIGTERM, as the kubelet sends; the exit codes (SIGKILL after the grace period)."""
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=grace))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes


@pytest.fixture
def empty_pg_url(pg_server: str) -> Iterator[str]:
    """A PostgreSQL database without any migration (the conftest's are migrated)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    from sluice.shared.database import libpq_dsn

    name = f"sluice_k8s_{os.getpid()}"

    def admin(sql: str) -> None:
        conn = psycopg2.connect(libpq_dsn(pg_server))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
        conn.close()

    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{name}"')
    yield make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_workers_wait_for_the_migrate_job(
    tmp_path: Path, empty_pg_url: str, redis_url: str
) -> None:
    docs = rendered("overlays/example")
    secrets = {"broker-url": redis_url, "postgres-url": empty_pg_url}
    worker = Pod(docs, "sluice-worker-postgres", tmp_path / "worker", secrets)
    waiting = worker.start("wait-for-schema")
    try:
        time.sleep(3)
        assert waiting.poll() is None, worker.log("wait-for-schema")
        job = Pod(docs, "sluice-migrate", tmp_path / "job", secrets)
        done = job.run("migrate")
        assert done.returncode == 0, done.stdout + done.stderr
        assert waiting.wait(timeout=30) == 0
    finally:
        worker.stop()
    log = worker.log("wait-for-schema")
    assert "waiting for the sluice-migrate Job to apply 0001_core" in log
    assert "PostgreSQL schema is current" in log
    assert not list(job.volumes["data"].iterdir()), "the Job started an embedded server"


def test_worker_probes_ping_their_own_node(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    docs = rendered("overlays/example")
    pod = Pod(
        docs, "sluice-worker-postgres", tmp_path, {"broker-url": redis_url, "postgres-url": pg_url}
    )
    assert pod.run("wait-for-schema", timeout=30).returncode == 0
    pod.start("worker")
    try:
        pod.until("worker", "startupProbe")
        assert pod.probe("worker", "readinessProbe")[0]
        assert pod.probe("worker", "livenessProbe")[0]
        # Another role's node is not running here: no answer.
        ok, out = pod.probe("worker", "readinessProbe", replace={"postgres@%h": "sqlite@%h"})
        assert not ok and "did not answer a ping" in out, out
        # Redis away: not ready, but not restarted for it.
        gone = f"redis://127.0.0.1:{free_port()}/0"
        ok, out = pod.probe("worker", "readinessProbe", SLUICE_BROKER_URL=gone)
        assert not ok and "broker unreachable" in out, out
        ok, out = pod.probe("worker", "livenessProbe", SLUICE_BROKER_URL=gone)
        assert ok and "broker unreachable" in out, out
    finally:
        codes = pod.stop()
    assert codes == [0], pod.log("worker")[-3000:]  # the warm shutdown, within the grace period
    assert "Warm shutdown" in pod.log("worker") or "warm shutdown" in pod.log("worker").lower()


def test_the_sqlite_writer_pod_serves_beside_its_file(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    docs = rendered("overlays/example")
    secrets = {"broker-url": redis_url, "postgres-url": pg_url, "console-token": "c" * 32}
    pod = Pod(docs, "sluice-sqlite-writer", tmp_path, secrets)
    for init in pod.spec["initContainers"]:
        done = pod.run(init["name"])
        assert done.returncode == 0, f"{init['name']}: {done.stdout}{done.stderr}"
    assert (pod.volumes["data"] / "sluice.sqlite").is_file()
    pod.start("worker")
    pod.start("serve")
    try:
        pod.until("worker", "startupProbe")
        health = json.loads(pod.until("serve", "readinessProbe", seconds=30))
        assert health["status"] == "ok" and {"broker", "postgres", "sqlite"} <= set(
            health["checks"]
        )
        assert pod.probe("serve", "livenessProbe")[0]
        assert pod.probe("worker", "readinessProbe")[0]
    finally:
        codes = pod.stop()
    assert codes == [0, 0], pod.log("worker")[-2000:] + pod.log("serve")[-2000:]


def test_beat_and_flower_start_as_given(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    """Flower answers its probes; of the two beats one holds the lock, and the other takes over
    when it stops (as in a rollout)."""
    docs = rendered("overlays/example")
    secrets = {"broker-url": redis_url, "postgres-url": pg_url, "flower-auth": "admin:not-secret"}
    beats = [Pod(docs, "sluice-beat", tmp_path / f"beat{i}", secrets) for i in range(2)]
    flower = Pod(docs, "sluice-flower", tmp_path / "flower", secrets)

    def holders() -> list[Pod]:
        return [b for b in beats if "Acquired lock" in b.log("beat")]

    for beat in beats:
        beat.start("beat")
    flower.start("flower")
    try:
        flower.until("flower", "readinessProbe", seconds=60)
        assert flower.probe("flower", "livenessProbe")[0]
        deadline = time.monotonic() + 20
        while not holders() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)
        assert len(holders()) == 1, [b.log("beat") for b in beats]
        (holder,) = holders()
        (standby,) = [b for b in beats if b is not holder]
        assert holder.stop() == [0], holder.log("beat")
        deadline = time.monotonic() + 20
        while not ("Acquired lock" in standby.log("beat") or time.monotonic() > deadline):
            time.sleep(0.5)
        assert "Acquired lock" in standby.log("beat"), standby.log("beat")
    finally:
        codes = [pod.stop() for pod in (*beats, flower)]
    assert codes == [[0], [0], [0]], flower.log("flower")[-2000:]
