"""The Cedar policy engine: load and validate a policy set, evaluate requests, explain decisions.

A :class:`PolicyEngine` is built from Cedar policy files and the Concord schema
(``policies/schema.cedarschema``). Loading is strict, so a bad policy stops the server at
start-up or a publish request, never a study at run time:

* the schema must parse;
* every file must parse and validate against the schema (the validator's message, the
  file name and the line of the offending policy are reported in :class:`PolicyLoadError`);
* every policy carries an ``@id("...")`` annotation, unique across the set, and every
  ``forbid`` an ``@reason("...")`` sentence; templates (``?principal`` slots) are refused;
* an empty set is refused (it would deny everything, almost certainly by mistake).

Evaluation always passes the schema (without it Cedar skips a ``forbid`` that errors and
may answer Allow). The decision is deny by default: no satisfied ``permit`` means denied
with the reason "No policy permits ...", any evaluation error means denied with that
error, and every satisfied ``forbid`` contributes its ``@reason`` sentence. Reasons come
back under the policies' ``@id`` (the combined set is built from Cedar's JSON form with
the ``@id`` values as policy ids, so Cedar itself reports them).

``@reason`` sentences may name request values in braces, filled in from the request:
``{resource.id}``, ``{resource.max_epsilon_per_study}``, ``{context.study.epsilon}``,
``{principal.organisation}``. Entity references are followed through the request's
entities; sets are listed, decimals shown without trailing zeros.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import cedarpy

from concord_protocol.canonical import sha256_hex
from concord_protocol.errors import PolicyLoadError

__all__ = [
    "NAMESPACE",
    "Decision",
    "EntityUid",
    "PolicyEngine",
    "PolicyInfo",
    "PolicyLoadError",
    "Reason",
    "Request",
    "policy_set_hash",
]

NAMESPACE = "Concord"
POLICY_SUFFIX = ".cedar"
SCHEMA_FILENAME = "schema.cedarschema"

#: An entity uid in Cedar's JSON form: ``{"type": "Concord::Dataset", "id": "bc-a"}``.
EntityUid = dict[str, str]

_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")
_POSITIONAL_ID = re.compile(r"^policy(\d+)$")

_ACTION_PHRASES = {
    "SubmitStudy": "submit a study using",
    "UseDataset": "use",
    "RunRound": "run a round on",
    "ReleaseModel": "release the results of",
    "ReadReport": "read the report of",
}


@dataclass(frozen=True)
class Reason:
    """Why a decision came out as it did: a policy ``@id`` and a readable sentence.

    ``resource`` names the request's resource (e.g. ``Dataset bc-a``) the reason was given
    for; ``source`` says which policy set gave it (``consortium`` or ``site:<id>``).
    """

    policy_id: str
    text: str
    resource: str | None = None
    source: str = "consortium"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the audit log and API responses)."""
        return {
            "policy_id": self.policy_id,
            "text": self.text,
            "resource": self.resource,
            "source": self.source,
        }


@dataclass(frozen=True)
class Decision:
    """The outcome of one or more evaluations.

    ``reasons`` are the satisfied forbids (or the default-deny / error reasons) when
    denied, and the permits that applied when allowed. ``policy_set_hash`` identifies the
    consortium policy set (and ``site_policy_set_hash`` the site's, when one took part):
    record both with the decision.
    """

    allowed: bool
    reasons: list[Reason]
    errors: list[str]
    policy_set_hash: str
    site_policy_set_hash: str | None = None

    @property
    def denied(self) -> bool:
        """``not allowed``."""
        return not self.allowed

    def reason_texts(self) -> list[str]:
        """The reasons' sentences, in order."""
        return [reason.text for reason in self.reasons]

    def policy_ids(self) -> list[str]:
        """The reasons' policy ids, in order, without repeats."""
        return list(dict.fromkeys(reason.policy_id for reason in self.reasons))

    def as_record(self) -> dict[str, Any]:
        """What the audit log records: decision, policy-set hash(es), reasons by policy id."""
        record: dict[str, Any] = {
            "decision": "allow" if self.allowed else "deny",
            "policy_set_hash": self.policy_set_hash,
            "reasons": [reason.as_dict() for reason in self.reasons],
            "errors": list(self.errors),
        }
        if self.site_policy_set_hash is not None:
            record["site_policy_set_hash"] = self.site_policy_set_hash
        return record


@dataclass(frozen=True)
class Request:
    """One authorization request: action name (e.g. ``SubmitStudy``), principal,
    resource, and context (Cedar JSON values)."""

    action: str
    principal: EntityUid
    resource: EntityUid
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyInfo:
    """One loaded policy: its ``@id``, effect, ``@reason`` and where it came from."""

    policy_id: str
    effect: Literal["permit", "forbid"]
    reason: str
    file: str
    line: int | None


def policy_set_hash(texts: Mapping[str, str], schema: str) -> str:
    """SHA-256 (hex) over the canonical JSON of the sorted (filename, text) pairs and the
    schema text. Any change to any file, a rename, or a schema change changes it."""
    return sha256_hex(
        {"policies": [[name, texts[name]] for name in sorted(texts)], "schema": schema}
    )


# --------------------------------------------------------------------------- loading


def _statement_lines(text: str) -> list[tuple[int, str]]:
    """Split Cedar policy text at top-level ``;`` (outside strings and comments).

    Returns (line of the statement's first token, statement text) per statement; trailing
    text without ``;`` is returned as a last statement so parse errors in it can be placed.
    """
    statements: list[tuple[int, str]] = []
    start = 0
    first_line: int | None = None
    line = 1
    i = 0
    in_string = False
    while i < len(text):
        char = text[i]
        if in_string:
            if char == "\\":
                i += 1
            elif char == '"':
                in_string = False
            elif char == "\n":
                line += 1
        elif char == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        elif char == "\n":
            line += 1
        elif char == ";":
            if first_line is not None:
                statements.append((first_line, text[start : i + 1]))
            start = i + 1
            first_line = None
        elif not char.isspace():
            if first_line is None:
                first_line = line
            if char == '"':
                in_string = True
        i += 1
    if first_line is not None:
        statements.append((first_line, text[start:]))
    return statements


def _parse_error_line(text: str) -> int | None:
    """Line of the first statement that does not parse on its own (None if unknown)."""
    for line, statement in _statement_lines(text):
        try:
            cedarpy.PolicySet.from_str(statement)
        except ValueError:
            return line
    return None


def _positional_index(policy_id: str) -> int:
    match = _POSITIONAL_ID.match(policy_id)
    return int(match.group(1)) if match else 0


def _read_directory(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        raise PolicyLoadError(str(directory), "not a directory of .cedar policy files")
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.cedar"))}


class PolicyEngine:
    """A validated Cedar policy set plus its schema. Immutable; safe to share."""

    def __init__(
        self,
        texts: Mapping[str, str],
        schema_text: str,
        policy_set: cedarpy.PolicySet,
        schema: cedarpy.Schema,
        policies: Mapping[str, PolicyInfo],
        label: str,
    ) -> None:
        self._texts = dict(texts)
        self._schema_text = schema_text
        self._policy_set = policy_set
        self._schema = schema
        self._policies = dict(policies)
        self.label = label
        self.policy_set_hash = policy_set_hash(self._texts, schema_text)
        self._position = {pid: index for index, pid in enumerate(self._policies)}

    # ----------------------------------------------------------------- construction

    @classmethod
    def load(
        cls,
        source: Path | Mapping[str, str],
        schema: Path | str,
        *,
        label: str = "consortium",
    ) -> PolicyEngine:
        """Load and validate a policy set.

        ``source``: a directory (its ``*.cedar`` files, not recursive) or a mapping of
        file name to policy text. ``schema``: a path to the schema file or the schema text.
        ``label``: which set this is (``consortium``, ``site:<id>``), shown in reasons.
        Raises :class:`PolicyLoadError` naming the file, the line when known, and the
        parser's or validator's message.
        """
        if isinstance(schema, Path):
            schema_name = schema.name
            try:
                schema_text = schema.read_text(encoding="utf-8")
            except OSError as exc:
                raise PolicyLoadError(str(schema), f"cannot read the schema: {exc}") from exc
        else:
            schema_name, schema_text = SCHEMA_FILENAME, schema
        texts = _read_directory(source) if isinstance(source, Path) else dict(source)
        try:
            schema_handle = cedarpy.Schema.from_str(schema_text)
        except ValueError as exc:
            raise PolicyLoadError(schema_name, f"the schema does not parse: {exc}") from exc
        try:
            return cls._build(texts, schema_text, schema_handle, label)
        except PolicyLoadError as exc:
            if isinstance(source, Path) and exc.file in texts:
                # Name the file by its path when it came from a directory.
                raise PolicyLoadError(
                    str(source / exc.file),
                    exc.problem,
                    exc.line,
                    [{**item, "file": str(source / exc.file)} for item in exc.details],
                ) from exc
            raise

    @classmethod
    def _build(
        cls, texts: dict[str, str], schema_text: str, schema_handle: cedarpy.Schema, label: str
    ) -> PolicyEngine:

        policies: dict[str, PolicyInfo] = {}
        static: dict[str, Any] = {}
        for name in sorted(texts):
            file_policies = cls._load_file(name, texts[name], schema_handle)
            for info, est in file_policies:
                if info.policy_id in policies:
                    other = policies[info.policy_id]
                    raise PolicyLoadError(
                        name,
                        f'@id("{info.policy_id}") is already used in {other.file}'
                        + (f", line {other.line}" if other.line else "")
                        + ": policy ids must be unique",
                        info.line,
                    )
                policies[info.policy_id] = info
                static[info.policy_id] = est
        if not policies:
            raise PolicyLoadError(
                ", ".join(sorted(texts)) or "(no files)",
                "the policy set is empty: it would deny everything",
            )
        document = {"staticPolicies": static, "templates": {}, "templateLinks": []}
        policy_set = cedarpy.PolicySet.from_json_str(json.dumps(document))
        return cls(texts, schema_text, policy_set, schema_handle, policies, label)

    @staticmethod
    def _load_file(
        name: str, text: str, schema: cedarpy.Schema
    ) -> list[tuple[PolicyInfo, dict[str, Any]]]:
        if not name.endswith(POLICY_SUFFIX) or "/" in name or "\\" in name:
            raise PolicyLoadError(name, f"policy file names end in {POLICY_SUFFIX}, no folders")
        try:
            cedarpy.PolicySet.from_str(text)
        except ValueError as exc:
            raise PolicyLoadError(name, f"does not parse: {exc}", _parse_error_line(text)) from exc
        statements = _statement_lines(text)

        def line_of(positional: str) -> int | None:
            match = _POSITIONAL_ID.match(positional)
            if match and int(match.group(1)) < len(statements):
                return statements[int(match.group(1))][0]
            return None

        result = cedarpy.validate_policies(text, schema)
        if not result.validation_passed:
            problems = [
                {
                    "file": name,
                    "line": line_of(error.policy_id),
                    "policy_id": result.id_annotations_by_policy_id.get(error.policy_id),
                    "message": error.error,
                }
                for error in result.errors
            ]
            first_error = result.errors[0]
            raise PolicyLoadError(
                name,
                f"does not validate against the schema: {first_error.error}",
                line_of(first_error.policy_id),
                problems,
            )
        est = json.loads(cedarpy.policies_to_json_str(text))
        if est.get("templates"):
            raise PolicyLoadError(
                name, "policy templates (?principal / ?resource slots) are not supported"
            )
        loaded: list[tuple[PolicyInfo, dict[str, Any]]] = []
        for positional, policy in sorted(
            est.get("staticPolicies", {}).items(), key=lambda item: _positional_index(item[0])
        ):
            line = line_of(positional)
            annotations: dict[str, str] = policy.get("annotations") or {}
            policy_id = annotations.get("id", "")
            if not _ID_PATTERN.match(policy_id):
                raise PolicyLoadError(
                    name,
                    'every policy needs an @id("...") annotation of lower-case letters, '
                    f"digits, '.', '_' or '-' (found {policy_id!r})",
                    line,
                )
            effect: Literal["permit", "forbid"] = (
                "forbid" if policy.get("effect") == "forbid" else "permit"
            )
            reason = annotations.get("reason", "").strip()
            if effect == "forbid" and not reason:
                raise PolicyLoadError(
                    name,
                    f'forbid policy "{policy_id}" needs a @reason("...") sentence '
                    "saying why a request is denied",
                    line,
                )
            loaded.append((PolicyInfo(policy_id, effect, reason, name, line), policy))
        return loaded

    # ----------------------------------------------------------------- properties

    @property
    def texts(self) -> dict[str, str]:
        """File name -> policy text, as loaded."""
        return dict(self._texts)

    @property
    def schema_text(self) -> str:
        """The schema text the set was validated against (and is evaluated with)."""
        return self._schema_text

    @property
    def policies(self) -> dict[str, PolicyInfo]:
        """Policy ``@id`` -> :class:`PolicyInfo`."""
        return dict(self._policies)

    def reason_template(self, policy_id: str) -> str:
        """The ``@reason`` text of a policy (empty if none)."""
        info = self._policies.get(policy_id)
        return info.reason if info else ""

    # ----------------------------------------------------------------- evaluation

    def evaluate(
        self,
        action: str,
        principal: EntityUid,
        resource: EntityUid,
        context: dict[str, Any],
        entities: list[dict[str, Any]],
    ) -> Decision:
        """Evaluate one request (with the schema). Deny by default; errors deny."""
        return self.evaluate_batch([Request(action, principal, resource, context)], entities)[0]

    def evaluate_batch(
        self, requests: Sequence[Request], entities: list[dict[str, Any]]
    ) -> list[Decision]:
        """Evaluate several requests against the same entities, one :class:`Decision` each."""
        if not requests:
            return []
        cedar_requests = [
            {
                "principal": request.principal,
                "action": {"type": f"{NAMESPACE}::Action", "id": request.action},
                "resource": request.resource,
                "context": request.context,
            }
            for request in requests
        ]
        try:
            results = cedarpy.is_authorized_batch(
                cedar_requests, self._policy_set, entities, schema=self._schema
            )
        except (ValueError, TypeError) as exc:
            return [self._error_decision(request, str(exc)) for request in requests]
        resolver = _Resolver(entities)
        return [
            self._decision(request, result, resolver)
            for request, result in zip(requests, results, strict=True)
        ]

    def _error_decision(self, request: Request, error: str) -> Decision:
        return Decision(
            allowed=False,
            reasons=[
                Reason(
                    "evaluation.error",
                    f"The {self.label} policy could not be evaluated, so the request is "
                    f"denied: {_first_line(error)}",
                    _describe(request.resource),
                    self.label,
                )
            ],
            errors=[error],
            policy_set_hash=self.policy_set_hash,
        )

    def _decision(
        self, request: Request, result: cedarpy.AuthzResult, resolver: _Resolver
    ) -> Decision:
        errors = [str(error) for error in result.diagnostics.errors]
        if errors:
            return self._error_decision(request, "; ".join(errors))
        resource = _describe(request.resource)
        # Cedar's order is arbitrary: report in policy-set order (file, then position).
        policy_ids = sorted(
            (str(pid) for pid in result.diagnostics.reasons),
            key=lambda pid: self._position.get(pid, len(self._position)),
        )
        reasons = [
            Reason(
                pid,
                resolver.render(self.reason_template(pid) or f"Policy {pid} applies.", request),
                resource,
                self.label,
            )
            for pid in policy_ids
        ]
        if result.allowed:
            return Decision(True, reasons, [], self.policy_set_hash)
        if not reasons:
            phrase = _ACTION_PHRASES.get(request.action, f"perform {request.action} on")
            reasons = [
                Reason(
                    "default.deny",
                    f"No {self.label} policy permits {_describe(request.principal)} to "
                    f"{phrase} {resource}.",
                    resource,
                    self.label,
                )
            ]
        return Decision(False, reasons, [], self.policy_set_hash)


# --------------------------------------------------------------------------- reasons


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _describe(uid: EntityUid) -> str:
    """``Concord::Dataset`` / ``bc-a`` -> ``dataset bc-a``."""
    kind = uid.get("type", "").rsplit("::", 1)[-1].lower() or "entity"
    return f"{kind} {uid.get('id', '?')}"


def _format_decimal(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text if "." in text else f"{text}.0"


class _Resolver:
    """Fills ``{path}`` placeholders of ``@reason`` sentences from a request."""

    def __init__(self, entities: list[dict[str, Any]]) -> None:
        self._entities: dict[tuple[str, str], dict[str, Any]] = {}
        for entity in entities:
            uid = entity.get("uid", {})
            self._entities[(str(uid.get("type")), str(uid.get("id")))] = entity.get("attrs", {})

    def render(self, template: str, request: Request) -> str:
        def replace(match: re.Match[str]) -> str:
            value = self._lookup(match.group(1).split("."), request)
            return match.group(0) if value is _MISSING else self._show(value)

        return _PLACEHOLDER.sub(replace, template)

    def _lookup(self, path: list[str], request: Request) -> Any:
        roots: dict[str, Any] = {
            "principal": {"__entity": request.principal},
            "resource": {"__entity": request.resource},
            "context": request.context,
        }
        if path[0] not in roots:
            return _MISSING
        value: Any = roots[path[0]]
        for segment in path[1:]:
            uid = self._as_uid(value)
            if uid is not None:
                if segment == "id":
                    value = uid.get("id")
                    continue
                attrs = self._entities.get((str(uid.get("type")), str(uid.get("id"))))
                if attrs is None or segment not in attrs:
                    return None
                value = attrs[segment]
            elif isinstance(value, dict) and segment in value:
                value = value[segment]
            else:
                return None
        return value

    @staticmethod
    def _as_uid(value: Any) -> dict[str, Any] | None:
        if isinstance(value, dict):
            if "__entity" in value and isinstance(value["__entity"], dict):
                return value["__entity"]
            if set(value) == {"type", "id"}:
                return value
        return None

    def _show(self, value: Any) -> str:
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, int | str):
            return str(value)
        uid = self._as_uid(value)
        if uid is not None:
            return str(uid.get("id"))
        if isinstance(value, dict) and "__extn" in value:
            arg = value["__extn"].get("arg")
            try:
                return _format_decimal(Decimal(str(arg)))
            except InvalidOperation:
                return str(arg)
        if isinstance(value, list):
            return ", ".join(sorted(self._show(item) for item in value)) or "none"
        return str(value)


_MISSING: Any = object()
