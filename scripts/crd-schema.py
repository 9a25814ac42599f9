#!/usr/bin/env python3
"""Turns the KvCluster CRD's openAPIV3Schema into a JSON Schema for
check-jsonschema, with what the API server enforces beyond plain JSON Schema
made explicit: unknown fields are refused (strict field validation),
`x-kubernetes-list-type: set` means unique items. CEL rules
(x-kubernetes-validations) cannot be expressed here; operator/tests/k8s_cel.rs
evaluates them.

usage: crd-schema.py deploy/crd.yaml > kvcluster.schema.json
"""
import json
import sys

import yaml


def tighten(node):
    if isinstance(node, dict):
        if node.get("x-kubernetes-list-type") == "set":
            node["uniqueItems"] = True
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            tighten(value)
    elif isinstance(node, list):
        for value in node:
            tighten(value)


def main():
    with open(sys.argv[1]) as f:
        crd = yaml.safe_load(f)
    versions = crd["spec"]["versions"]
    schema = next(v for v in versions if v.get("storage"))["schema"]["openAPIV3Schema"]
    tighten(schema)
    props = schema.setdefault("properties", {})
    group = crd["spec"]["group"]
    version = next(v for v in versions if v.get("storage"))["name"]
    props["apiVersion"] = {"const": f"{group}/{version}"}
    props["kind"] = {"const": crd["spec"]["names"]["kind"]}
    # ObjectMeta is validated by the API server itself, not by this CRD.
    props["metadata"] = {"type": "object"}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    json.dump(schema, sys.stdout, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
