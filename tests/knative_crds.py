"""Offline validation of Kubernetes manifests against the official Knative CRD schemas.

`validate_manifest(doc, crd_dir)` finds the CRD for the document's `apiVersion`/`kind` among the
CRD YAML files in `crd_dir` and checks the document against that version's `openAPIV3Schema`
with the rules the API server applies to a structural schema (with `kubectl`'s default strict field
validation):

- an object schema without `additionalProperties` accepts no unknown fields, unless it has
  `x-kubernetes-preserve-unknown-fields: true`;
- `apiVersion`, `kind` and `metadata` are implied at the root (and for
  `x-kubernetes-embedded-resource`), with `metadata` checked as an ObjectMeta;
- `x-kubernetes-int-or-string` accepts an integer or a string; `nullable` accepts null;
- `x-kubernetes-list-type: set|map` rejects duplicate items / duplicate map keys.

A core `v1` ConfigMap is checked structurally (no CRD exists for it). Errors are readable strings
with a JSON path, e.g. `Service/digits: $.spec.template.spec.containers[0].image: 3 is not of type
'string'`. What admission webhooks add on top (Knative's feature flags, traffic sums) is not here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

Schema = dict[str, Any]

_DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}

# ObjectMeta fields a manifest may carry (k8s.io/apimachinery ObjectMeta); unknown keys are rejected.
OBJECT_META: Schema = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": _DNS1123_SUBDOMAIN},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": _DNS1123_LABEL},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
        "selfLink": {"type": "string"},
    },
}

CONFIG_MAP: Schema = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata"],
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "ConfigMap"},
        "metadata": {**OBJECT_META, "required": ["name"]},
        "data": _STRING_MAP,
        "binaryData": _STRING_MAP,
        "immutable": {"type": "boolean"},
    },
}

_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf")
_KEPT = (
    "type",
    "enum",
    "required",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "uniqueItems",
    "multipleOf",
)


def to_json_schema(node: Mapping[str, Any], embedded: bool = False) -> Schema:
    """Translate one structural OpenAPI v3 schema node (and its children) into plain JSON Schema."""
    out: Schema = {k: node[k] for k in _KEPT if k in node}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    for key in _SUBSCHEMA_LISTS:
        if key in node:
            out[key] = [to_json_schema(sub) for sub in node[key]]
    if "not" in node:
        out["not"] = to_json_schema(node["not"])
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    list_type = node.get("x-kubernetes-list-type")
    if list_type == "set":
        out["uniqueItems"] = True
    elif list_type == "map" and node.get("x-kubernetes-list-map-keys"):
        out["listMapKeys"] = list(node["x-kubernetes-list-map-keys"])
    embedded = embedded or bool(node.get("x-kubernetes-embedded-resource"))
    properties = {name: to_json_schema(sub) for name, sub in node.get("properties", {}).items()}
    if embedded:
        properties.setdefault("apiVersion", {"type": "string"})
        properties.setdefault("kind", {"type": "string"})
        properties["metadata"] = OBJECT_META
    if properties:
        out["properties"] = properties
    is_object = node.get("type") == "object" or "properties" in node
    if is_object and not node.get("x-kubernetes-preserve-unknown-fields"):
        extra = node.get("additionalProperties")
        if isinstance(extra, Mapping):
            out["additionalProperties"] = to_json_schema(extra)
        elif extra is True:
            out["additionalProperties"] = True
        else:
            out["additionalProperties"] = False
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: Schema) -> Iterator[Any]:
    """`x-kubernetes-list-type: map`: no two items may share the values of the key fields."""
    if not validator.is_type(instance, "array"):
        return
    seen: dict[tuple[Any, ...], int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, Mapping):
            continue
        key = tuple(repr(item.get(k)) for k in keys)
        if key in seen:
            shown = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
            yield jsonschema.ValidationError(f"items {seen[key]} and {index} have the same key ({shown})")
        else:
            seen[key] = index


_Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"listMapKeys": _list_map_keys})


def _root_schema(openapi: Mapping[str, Any], api_version: str, kind: str) -> Schema:
    schema = to_json_schema(openapi)
    properties = schema.setdefault("properties", {})
    properties["apiVersion"] = {"const": api_version}
    properties["kind"] = {"const": kind}
    properties["metadata"] = OBJECT_META
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata"})
    schema["additionalProperties"] = False
    return schema


@functools.cache
def _load_schemas(crd_dir: Path) -> dict[tuple[str, str], Schema]:
    schemas: dict[tuple[str, str], Schema] = {}
    for path in sorted(crd_dir.glob("*.y*ml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                api_version = f"{group}/{version['name']}"
                openapi = version["schema"]["openAPIV3Schema"]
                schemas[(api_version, kind)] = _root_schema(openapi, api_version, kind)
    return schemas


def known_kinds(crd_dir: Path) -> list[tuple[str, str]]:
    """Every (apiVersion, kind) the CRDs in `crd_dir` define, plus the structural ConfigMap."""
    return sorted({*_load_schemas(crd_dir.resolve()), ("v1", "ConfigMap")})


def _json_path(parts: Iterable[Any]) -> str:
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validate_manifest(doc: Any, crd_dir: Path) -> list[str]:
    """Validate one manifest; return readable errors (empty when valid)."""
    if not isinstance(doc, Mapping):
        return [f"$: a manifest must be a mapping, not {type(doc).__name__}"]
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    meta = doc.get("metadata")
    name = meta.get("name", "?") if isinstance(meta, Mapping) else "?"
    label = f"{kind}/{name}"
    if (api_version, kind) == ("v1", "ConfigMap"):
        schema = CONFIG_MAP
    else:
        found = _load_schemas(crd_dir.resolve()).get((str(api_version), str(kind)))
        if found is None:
            known = ", ".join(f"{v} {k}" for v, k in known_kinds(crd_dir))
            return [f"{label}: no schema for apiVersion {api_version!r} kind {kind!r} (known: {known})"]
        schema = found
    found_errors = sorted(_Validator(schema).iter_errors(doc), key=lambda e: (list(map(str, e.path)), e.message))
    errors = [f"{label}: {_json_path(e.path)}: {e.message}" for e in found_errors]
    if isinstance(meta, Mapping) and not meta.get("name") and not meta.get("generateName"):
        errors.append(f"{label}: $.metadata: 'name' or 'generateName' is required")
    return errors


def validate_file(path: Path, crd_dir: Path) -> list[str]:
    """Validate every document of a (multi-document) YAML file; errors are prefixed `file#index`."""
    try:
        docs = list(yaml.safe_load_all(Path(path).read_text()))
    except yaml.YAMLError as exc:
        return [f"{path}: not valid YAML: {exc}"]
    errors: list[str] = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        errors += [f"{path}#{index}: {error}" for error in validate_manifest(doc, crd_dir)]
    return errors
