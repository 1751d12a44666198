"""Edit a committed Service's `spec.traffic` the way `kn service update` does, for GitOps.

    onnxfn traffic digits digits-v1=90 @latest=10 --tag @latest=candidate --untag old
    onnxfn traffic digits --traffic current=90 --traffic candidate=10     # kn's spelling works too

`apply_traffic` follows kn's traffic computation (knative/client `pkg/traffic/compute.go`, the
flags of `kn service update`) for a traffic-only update (no new revision): `--untag` first, then
`--tag ref=tag`, then, if any split is given, every percent is reset to 0 and the splits applied
(`ref` = a tag, a revision name or `@latest`); a sum under 100 goes to the one existing target left
unnamed; targets with 0 % and no tag are dropped. The result must pass Serving's route rules
(percents sum to 100, unique DNS-1035 tags). The latest ready revision, which kn reads from the
Service status, is taken to be `spec.template.metadata.name` of the file.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from shared import service_files
from shared.render import replace_traffic
from shared.service_files import CPU_VARIANT, DNS_LABEL, KNATIVE_DIR, ServiceFile, write_file

LATEST = "@latest"
FIELD_ORDER = ("tag", "revisionName", "configurationName", "latestRevision", "percent")
Target = dict[str, Any]


class TrafficError(ValueError):
    """The requested traffic change cannot be applied (the message says why, in kn's words)."""


def _split_pair(pair: str) -> tuple[str, str]:
    """`ref=value` -> (ref, value); a bare `value` means `@latest=value` (kn `splitByEqualSign`)."""
    parts = pair.split("=")
    if len(parts) == 1:
        return LATEST, parts[0]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise TrafficError(f"expecting the value format in value1=value2, given {pair}")
    return parts[0], parts[1].removesuffix("%")


def _flatten(values: Iterable[str]) -> list[str]:
    """Repeated flags and comma lists, as kn's string-slice flags accept them."""
    return [item for value in values for item in value.split(",") if item]


def _repetition(flag: str, ref: str) -> TrafficError:
    name = f"identifier {LATEST}" if ref == LATEST else f"revision reference {ref}"
    return TrafficError(f"repetition of {name} is not allowed, use only once with {flag} flag")


def parse_splits(splits: Sequence[str]) -> list[tuple[str, int]]:
    """Parse `ref=percent` items; refs must be unique and percents integers in 0..100."""
    parsed: list[tuple[str, int]] = []
    for item in splits:
        ref, raw = _split_pair(item)
        if any(ref == seen for seen, _ in parsed):
            raise _repetition("--traffic", ref)
        try:
            percent = int(raw)
        except ValueError:
            raise TrafficError(f"error converting given {raw} to integer value for traffic distribution") from None
        if not 0 <= percent <= 100:
            raise TrafficError(f"invalid value for traffic percent {percent}, expected 0 <= percent <= 100")
        parsed.append((ref, percent))
    return parsed


def _is_latest(target: Target) -> bool:
    return bool(target.get("latestRevision", not target.get("revisionName")))


def _remainder(parsed: list[tuple[str, int]], targets: list[Target], latest_name: str) -> list[tuple[str, int]]:
    """kn `verifyInput` for a traffic-only update: where a sum under 100 goes."""
    total = sum(percent for _, percent in parsed)
    if total > 100:
        raise TrafficError(f"given traffic percents sum to {total}, want <=100")
    if total == 100 or not parsed:
        return parsed
    missing = f"unable to allocate the remaining traffic: {100 - total}%. Reason: "
    if len(parsed) != len(targets) - 1:
        raise TrafficError(missing + "incorrect number of revisions specified. Only 1 revision should be missing")
    refs = {ref for ref, _ in parsed}
    if LATEST in refs:
        refs.add(latest_name)
    for target in targets:
        name = latest_name if _is_latest(target) else target.get("revisionName", "")
        if not name:
            break
        if name not in refs and target.get("tag", "") not in refs:
            return [*parsed, (name, 100 - total)]
    raise TrafficError(missing + "cannot determine the missing revision")


def _new_target(tag: str, revision: str, percent: int, latest: bool) -> Target:
    target: Target = {"tag": tag} if tag else {}
    if latest:
        target["latestRevision"] = True
    else:
        target.update(revisionName=revision, latestRevision=False)
    target["percent"] = percent
    return target


def _tag(targets: list[Target], ref: str, tag: str) -> list[Target]:
    """kn's `--tag` for one `ref=tag`; refuses to move an existing tag."""
    overwrite = f"refusing to overwrite existing tag in service, add flag '--untag {tag}' in command to untag it"
    present = any(t.get("tag") == tag for t in targets)
    if ref == LATEST:
        existing = next((t.get("tag", "") for t in targets if _is_latest(t)), "")
        if existing == tag:
            return targets
        if present:
            raise TrafficError(overwrite)
        if existing:
            raise TrafficError(
                f"tag '{existing}' exists on latest ready revision of service, refusing to overwrite existing"
                f" tag with '{tag}', add flag '--untag {existing}' in command to untag it"
            )
        for target in targets:
            if _is_latest(target):
                target["tag"] = tag
                return targets
        return [*targets, _new_target(tag, "", 0, True)]
    if any(t.get("tag") == tag and t.get("revisionName") == ref for t in targets):
        return targets
    if present:
        raise TrafficError(overwrite)
    for target in targets:
        if target.get("revisionName") == ref:
            if not target.get("tag"):
                target["tag"] = tag
                return targets
            break
    return [*targets, _new_target(tag, ref, 0, False)]


def _set_percent(targets: list[Target], ref: str, percent: int) -> list[Target]:
    """kn's precedence for one split: @latest, then a tag, then a revision name, else a new target."""
    if ref == LATEST:
        match = next((t for t in targets if _is_latest(t)), None)
        if match is None:
            return [*targets, _new_target("", "", percent, True)]
    else:
        match = next((t for t in targets if t.get("tag") == ref), None)
        match = match or next((t for t in targets if t.get("revisionName") == ref), None)
        if match is None:
            return [*targets, _new_target("", ref, percent, False)]
    match["percent"] = percent
    return targets


def check_traffic(targets: Sequence[Target]) -> list[str]:
    """Serving's route rules for `spec.traffic` (Knative Serving route validation); empty when valid."""
    errors: list[str] = []
    tags: set[str] = set()
    for index, target in enumerate(targets):
        where = f"spec.traffic[{index}]"
        revision, latest = target.get("revisionName", ""), target.get("latestRevision")
        if "configurationName" in target:
            errors.append(f"{where}.configurationName: not allowed in a Service")
        if latest is not None and bool(latest) == bool(revision):
            errors.append(f"{where}: latestRevision must be true iff revisionName is empty")
        tag = target.get("tag", "")
        if tag:
            if not DNS_LABEL.match(tag) or len(tag) > 63:
                errors.append(f"{where}.tag: {tag!r} is not a DNS-1035 label")
            if tag in tags:
                errors.append(f"{where}.tag: {tag!r} is used more than once")
            tags.add(tag)
        percent = target.get("percent", 0)
        if not isinstance(percent, int) or not 0 <= percent <= 100:
            errors.append(f"{where}.percent: {percent!r} is not an integer in 0..100")
    total = sum(t.get("percent", 0) for t in targets if isinstance(t.get("percent", 0), int))
    if total != 100:
        errors.append(f"Traffic targets sum to {total}, want 100")
    return errors


def apply_traffic(
    service: dict[str, Any], splits: Sequence[str] = (), tags: Sequence[str] = (), untags: Sequence[str] = ()
) -> dict[str, Any]:
    """A copy of `service` with `spec.traffic` changed as `kn service update --traffic/--tag/--untag`."""
    result = copy.deepcopy(service)
    spec = result.setdefault("spec", {})
    targets: list[Target] = spec.get("traffic") or [{"latestRevision": True, "percent": 100}]
    name = result.get("metadata", {}).get("name", "")
    latest_name = spec.get("template", {}).get("metadata", {}).get("name", "") or LATEST
    tag_pairs = [_split_pair(item) for item in _flatten(tags)]
    if sum(ref == LATEST for ref, _ in tag_pairs) > 1:
        raise _repetition("--tag", LATEST)
    parsed = _remainder(parse_splits(_flatten(splits)), targets, latest_name)

    missing = []
    for tag in _flatten(untags):
        match = next((t for t in targets if t.get("tag") == tag), None)
        if match is None:
            missing.append(tag)
        else:
            del match["tag"]
    if missing:
        raise TrafficError(f"tag(s) {', '.join(missing)} not present for any revisions of service {name}")
    for ref, tag in tag_pairs:
        targets = _tag(targets, ref, tag)
    if parsed:
        for target in targets:
            target["percent"] = 0
        for ref, percent in parsed:
            targets = _set_percent(targets, ref, percent)
    kept = [t for t in targets if t.get("tag") or t.get("percent", 0) != 0]
    spec["traffic"] = [{k: t[k] for k in FIELD_ORDER if k in t} for t in kept]
    errors = check_traffic(spec["traffic"])
    if errors:
        raise TrafficError("; ".join(errors))
    return result


def update_service(file: ServiceFile, splits: Sequence[str], tags: Sequence[str], untags: Sequence[str]) -> str:
    """Apply a traffic change to a committed Service; return the file's new text (not written)."""
    updated = apply_traffic(file.document, splits, tags, untags)
    return replace_traffic(file.text, updated["spec"]["traffic"])


def update_file(path: Path, splits: Sequence[str], tags: Sequence[str], untags: Sequence[str]) -> str:
    """`update_service` on the one Service in the file at `path`."""
    found = service_files.read_file(path)
    if len(found) != 1:
        raise TrafficError(f"{path}: holds {len(found)} Knative Services, want one")
    return update_service(found[0], splits, tags, untags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "service",
        help="Service name (edits <dir>/service-<name>.yaml and its CPU variant <dir>/cpu/..., which"
        " the embedded platform serves; revision names map between the variants: digits-v2 <-> digits-v2-cpu)",
    )
    parser.add_argument(
        "splits", nargs="*", metavar="REF=PERCENT", help="like kn --traffic (REF: revision, tag, @latest)"
    )
    parser.add_argument(
        "--traffic", action="append", default=[], metavar="REF=PERCENT", help="same as a positional split"
    )
    parser.add_argument("--tag", action="append", default=[], metavar="REF=TAG", help="like kn --tag (repeatable)")
    parser.add_argument("--untag", action="append", default=[], metavar="TAG", help="like kn --untag (repeatable)")
    parser.add_argument("--dir", type=Path, default=KNATIVE_DIR, help="folder of the Service files (default knative/)")
    parser.add_argument("--dry-run", action="store_true", help="print the new file instead of writing it")


CPU_SUFFIX = "-" + CPU_VARIANT


def for_variant(ref: str, service: str, cpu: bool) -> str:
    """A revision name in the variant's own form (`digits-v2` <-> `digits-v2-cpu`); tags, @latest as given."""
    name, sep, rest = ref.partition("=")
    base = name.removesuffix(CPU_SUFFIX)
    if not re.fullmatch(rf"{re.escape(service)}-v[0-9A-Za-z.-]+", base):
        return ref
    return (base + CPU_SUFFIX if cpu else base) + sep + rest


def run(args: argparse.Namespace) -> int:
    try:
        files = service_files.variants(args.dir, args.service)
    except service_files.SpecError as exc:
        print(f"onnxfn traffic: {exc}", file=sys.stderr)
        return 1
    if not files:
        print(f"onnxfn traffic: no Service {args.service!r} in {args.dir} or {args.dir / CPU_VARIANT}", file=sys.stderr)
        return 2
    texts = {}
    for file in files:
        splits = [for_variant(r, args.service, file.cpu) for r in [*args.splits, *args.traffic]]
        tags = [for_variant(r, args.service, file.cpu) for r in args.tag]
        try:
            texts[file.path] = update_service(file, splits, tags, args.untag)
        except (TrafficError, ValueError) as exc:
            print(f"onnxfn traffic: {file.path}: {exc}", file=sys.stderr)
            return 1
    for path, text in texts.items():
        if args.dry_run:
            sys.stdout.write(f"---\n# {path}\n{text}")
        else:
            write_file(path, text)
            print(f"updated {path}")
    return 0
