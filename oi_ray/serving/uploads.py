"""Request bodies of ``POST /v1/inspect``: pairs of lighting images, parsed, checked and decoded.

A pair is one image per lighting per side, named by lighting as in the model card
(``lights``), plus an optional ``id`` that the answer echoes. Two body formats:

- ``multipart/form-data``: file fields ``test.<Light>`` and ``golden.<Light>`` (``test`` and
  ``golden`` for a model of one image per side) and an optional text field ``id``. Several
  pairs in one body prefix every field with the pair's index: ``0.test.WhiteLight``, ``0.id``.
- ``application/json``: a pair ``{"id": ..., "test": {"<Light>": "<base64>", ...}, "golden":
  {...}}`` (``"test": "<base64>"`` for one image per side), a list of pairs, or
  ``{"pairs": [...]}``.

A pair may name a registered golden instead of uploading one: ``"golden_id": "C12"`` in JSON,
a text field ``golden_id`` (``0.golden_id``) in a form. The body of ``PUT /v1/goldens/{id}``
is a pair's golden side alone: ``{"golden": {...}}`` or, for a golden set of several shots,
``{"golden": [{...}, {...}]}``; in a form ``golden.<Light>`` fields, or ``<shot>.golden.<Light>``.

Every problem is a :class:`RequestError` naming the pair index, side and lighting. Decoding
is :func:`oi_ray.data.assemble.read_image` and :func:`~oi_ray.data.assemble.assemble`, the
functions evaluate and inference decode and tile with.
"""

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from oi_ray.data.assemble import InputGeometry, assemble, read_image
from oi_ray.errors import DataError, ImageSizeError
from oi_ray.serving.goldens import GoldenIdError, check_golden_id

SIDES = ("test", "golden")


class RequestError(Exception):
    """A request the service refuses: HTTP ``status``, a stable ``code`` and what is wrong."""

    def __init__(self, status: int, code: str, message: str, **where: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.where = {name: value for name, value in where.items() if value is not None}

    def body(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": {"code", "message", "pair"?, "side"?, "lighting"?}}``."""
        return {"error": {"code": self.code, "message": self.message, **self.where}}


@dataclass(frozen=True)
class PairUpload:
    """One pair as uploaded: encoded images in the model's lighting order, the golden's or the
    id of a registered golden (then ``golden`` is empty)."""

    id: str | None
    test: tuple[bytes, ...]
    golden: tuple[bytes, ...]
    golden_id: str | None = None


@dataclass(frozen=True)
class UploadLayout:
    """What a pair must hold: one image per lighting in ``lights`` (``()``: one per side)."""

    lights: tuple[str, ...]
    max_pairs: int

    def field(self, side: str, light: str | None) -> str:
        """``test.WhiteLight``, or ``test`` for a model of one image per side."""
        return f"{side}.{light}" if light else side

    def expected_fields(self) -> str:
        """The field names of one pair, for error messages."""
        return ", ".join(self.field(side, light) for side in SIDES for light in self.lights or (None,))


def pairs_from_json(body: bytes, layout: UploadLayout) -> list[PairUpload]:
    """Parse a JSON body: one pair, a list of pairs, or ``{"pairs": [...]}``."""
    document = _json_document(body)
    if isinstance(document, dict) and "pairs" in document:
        extra = sorted(set(document) - {"pairs"})
        if extra:
            raise RequestError(422, "unknown_field",
                               f"unknown top-level fields {extra}; expected only 'pairs'")
        document = document["pairs"]
    items = document if isinstance(document, list) else [document]
    _check_count(len(items), layout)
    return [_json_pair(index, item, layout) for index, item in enumerate(items)]


def _json_document(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, "malformed_json", f"the body is not valid JSON: {error}") from None
    except RecursionError:  # the parser recurses per bracket: a hostile body nests thousands deep
        raise RequestError(400, "malformed_json", "the body's JSON nests too deeply") from None


def _json_pair(index: int, item: Any, layout: UploadLayout) -> PairUpload:
    if not isinstance(item, dict):
        raise RequestError(422, "bad_pair", f"pair {index} is a JSON {type(item).__name__}; expected an "
                           f"object with 'test' and 'golden'", pair=index)
    extra = sorted(set(item) - {"id", "golden_id", *SIDES})
    if extra:
        raise RequestError(422, "unknown_field", f"pair {index}: unknown fields {extra}; expected id, "
                           f"test and golden (or golden_id)", pair=index)
    golden_id = _golden_id(index, item.get("golden_id"), "golden" in item)
    sides = {}
    for side in SIDES if golden_id is None else ("test",):
        value = item.get(side)
        if value is None:
            raise RequestError(422, "missing_image", f"pair {index}: no '{side}' images; expected "
                               f"{layout.expected_fields()}", pair=index, side=side)
        if not layout.lights:
            value = {None: value}
        elif not isinstance(value, dict):
            raise RequestError(422, "bad_pair", f"pair {index}: '{side}' must map each lighting "
                               f"({', '.join(layout.lights)}) to a base64 image", pair=index, side=side)
        sides[side] = {light: _base64(index, side, light, encoded) for light, encoded in value.items()}
    return _pair(index, _json_id(index, item.get("id")), sides, layout, golden_id)


def _golden_id(index: int, value: Any, has_golden: bool) -> str | None:
    """A pair's ``golden_id``, checked; None when the pair uploads its golden."""
    if value is None:
        return None
    if has_golden:
        raise RequestError(422, "bad_pair", f"pair {index}: give either golden images or a golden_id, "
                           "not both", pair=index)
    if not isinstance(value, str):
        raise RequestError(422, "bad_golden_id", f"pair {index}: golden_id must be a string", pair=index)
    try:
        return check_golden_id(value)
    except GoldenIdError as error:
        raise RequestError(422, "bad_golden_id", f"pair {index}: {error}", pair=index) from None


def _base64(index: int, side: str, light: str | None, encoded: Any) -> bytes:
    field = f"{side}.{light}" if light else side
    if not isinstance(encoded, str):
        raise RequestError(422, "bad_image", f"pair {index}: {field} must be a base64 string",
                           pair=index, side=side, lighting=light)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "bad_image", f"pair {index}: {field} is not valid base64",
                           pair=index, side=side, lighting=light) from None


def _json_id(index: int, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise RequestError(422, "bad_pair", f"pair {index}: id must be a string or a number", pair=index)


def pairs_from_form(fields: Iterable[tuple[str, bytes | str]], layout: UploadLayout) -> list[PairUpload]:
    """Parse multipart fields ``[<index>.]test.<Light>``, ``[<index>.]golden.<Light>`` and
    ``[<index>.]id`` (files as bytes, text fields as str)."""
    fields = list(fields)
    if not fields:
        raise RequestError(422, "no_pairs", f"the form holds no fields; expected {layout.expected_fields()}")
    return [_form_pair(index, group, layout) for index, group in enumerate(_indexed(fields, layout, PAIRS))]


def _form_pair(index: int, fields: dict[str, bytes | str], layout: UploadLayout) -> PairUpload:
    pair_id = fields.pop("id", None)
    if isinstance(pair_id, bytes):
        pair_id = pair_id.decode(errors="replace")
    golden_id = fields.pop("golden_id", None)
    if isinstance(golden_id, bytes):
        golden_id = golden_id.decode(errors="replace")
    golden_id = _golden_id(index, golden_id, any(field.partition(".")[0] == "golden" for field in fields))
    sides: dict[str, dict[str | None, bytes]] = {side: {} for side in SIDES}
    for field, value in fields.items():
        side, _, light = field.partition(".")
        if side not in SIDES:
            raise RequestError(422, "unknown_field", f"pair {index}: unknown field {field!r}; expected "
                               f"{layout.expected_fields()} and id", pair=index)
        if isinstance(value, str):
            raise RequestError(422, "bad_image", f"pair {index}: {field} must be a file part, not a text "
                               "field", pair=index, side=side, lighting=light or None)
        sides[side][light or None] = value
    return _pair(index, pair_id, sides, layout, golden_id)


def _pair(index: int, pair_id: str | None, sides: dict[str, dict[str | None, bytes]],
          layout: UploadLayout, golden_id: str | None = None) -> PairUpload:
    """Order each side's images by the model's lightings; refuse missing or extra ones."""
    used = SIDES if golden_id is None else ("test",)
    ordered = {side: _ordered(index, side, sides[side], layout) for side in used}
    return PairUpload(pair_id, ordered["test"], ordered.get("golden", ()), golden_id)


def _ordered(index: int, side: str, images: dict[str | None, bytes], layout: UploadLayout,
             item: str = "pair") -> tuple[bytes, ...]:
    """One side's images in the model's lighting order; missing or extra lightings refused.
    ``item``: what ``index`` counts, a request's pair or a golden's shot."""
    wanted = layout.lights or (None,)
    expected = layout.expected_fields() if item == "pair" else ", ".join(
        layout.field(side, light) for light in wanted)
    extra = [light for light in images if light not in wanted]
    if extra:
        names = ", ".join(layout.field(side, light) for light in extra)
        raise RequestError(422, "unknown_lighting", f"{item} {index}: {names} is not a lighting of this "
                           f"model; expected {expected}", pair=index, side=side, lighting=extra[0])
    for light in wanted:
        if light not in images:
            raise RequestError(422, "missing_image", f"{item} {index}: no {layout.field(side, light)} "
                               f"image; expected {expected}", pair=index, side=side, lighting=light)
    return tuple(images[light] for light in wanted)


def golden_from_json(body: bytes, layout: UploadLayout) -> list[tuple[bytes, ...]]:
    """The shots of a ``PUT /v1/goldens/{id}`` JSON body: ``{"golden": {...}}`` or
    ``{"golden": [{...}, ...]}``, each shot's images in the model's lighting order."""
    document = _json_document(body)
    if not isinstance(document, dict) or set(document) != {"golden"}:
        raise RequestError(422, "bad_golden", "the body must be {\"golden\": <a pair's golden side>} or "
                           "{\"golden\": [<shot>, ...]} for a golden set")
    shots = document["golden"] if isinstance(document["golden"], list) else [document["golden"]]
    _check_count(len(shots), layout, SHOTS)
    ordered = []
    for index, value in enumerate(shots):
        if not layout.lights:
            value = {None: value}
        elif not isinstance(value, dict):
            raise RequestError(422, "bad_golden", f"shot {index} must map each lighting "
                               f"({', '.join(layout.lights)}) to a base64 image", pair=index, side="golden")
        images = {light: _base64(index, "golden", light, encoded) for light, encoded in value.items()}
        ordered.append(_ordered(index, "golden", images, layout, "shot"))
    return ordered


def golden_from_form(fields: Iterable[tuple[str, bytes | str]],
                     layout: UploadLayout) -> list[tuple[bytes, ...]]:
    """The shots of a ``PUT /v1/goldens/{id}`` form: ``golden.<Light>`` files, or
    ``<shot>.golden.<Light>`` for a golden set."""
    shots = []
    for index, group in enumerate(_indexed(list(fields), layout, SHOTS)):
        images: dict[str | None, bytes] = {}
        for field, value in group.items():
            side, _, light = field.partition(".")
            if side != "golden":
                raise RequestError(422, "unknown_field", f"shot {index}: {field!r}; a golden's form holds "
                                   "golden.<Light> files (<shot>.golden.<Light> for a set)", pair=index)
            if isinstance(value, str):
                raise RequestError(422, "bad_image", f"shot {index}: {field} must be a file part, not a text "
                                   "field", pair=index, side=side, lighting=light or None)
            images[light or None] = value
        shots.append(_ordered(index, "golden", images, layout, "shot"))
    return shots


@dataclass(frozen=True)
class _Items:
    """What a body holds several of: a request's pairs or a golden's shots."""

    item: str  # "pair" or "shot"
    holder: str  # what holds them: "request" or "golden"
    none_code: str
    too_many_code: str
    field: str  # one unindexed field name, for messages
    verb: str  # what the service does with them


PAIRS = _Items("pair", "request", "no_pairs", "too_many_pairs", "test.<Light>", "takes")
SHOTS = _Items("shot", "golden", "bad_golden", "too_many_shots", "golden.<Light>", "keeps")


def _check_count(count: int, layout: UploadLayout, items: _Items = PAIRS) -> None:
    if count == 0:
        raise RequestError(422, items.none_code, f"the {items.holder} holds no {items.item}s")
    if count > layout.max_pairs:
        raise RequestError(413, items.too_many_code, f"the {items.holder} holds {count} {items.item}s; this "
                           f"service {items.verb} at most {layout.max_pairs} per {items.holder} "
                           "(serve.max_pairs_per_request)")


def _indexed(fields: list[tuple[str, bytes | str]], layout: UploadLayout,
             items: _Items) -> list[dict[str, bytes | str]]:
    """Form fields grouped by their leading ``<index>.`` (none: all of item 0), in index order:
    every field indexed or none, indices 0..n-1, as many items as the service takes."""
    groups: dict[int, dict[str, bytes | str]] = {}
    indexed = None
    for name, value in fields:
        head, _, rest = name.partition(".")
        has_index = head.isdigit() and bool(rest)
        if indexed is not None and has_index != indexed:
            raise RequestError(422, "bad_field", f"either every field carries a {items.item} index "
                               f"(0.{items.field}) or none does ({items.field})")
        indexed = has_index
        index, field = (int(head), rest) if has_index else (0, name)
        groups.setdefault(index, {})[field] = value
    _check_count(len(groups), layout, items)
    if sorted(groups) != list(range(len(groups))):
        raise RequestError(422, "bad_field",
                           f"{items.item} indices must be 0..{len(groups) - 1}; got {sorted(groups)}")
    return [groups[index] for index in range(len(groups))]


def decode_pairs(pairs: list[PairUpload], geometry: InputGeometry, lights: tuple[str, ...], *,
                 allow_resize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decode, resize and tile every pair as evaluate and inference do: ``(test, golden)``,
    each ``(B, H', W', 3)`` uint8 (``golden`` holds the pairs that upload theirs)."""
    uploaded = [index for index, pair in enumerate(pairs) if pair.golden_id is None]
    return (decode_side([pair.test for pair in pairs], "test", geometry, lights, allow_resize=allow_resize),
            decode_side([pairs[index].golden for index in uploaded], "golden", geometry, lights,
                        allow_resize=allow_resize, numbers=uploaded))


def decode_side(items: list[tuple[bytes, ...]], side: str, geometry: InputGeometry,
                lights: tuple[str, ...], *, allow_resize: bool,
                numbers: list[int] | None = None, item: str = "pair") -> np.ndarray:
    """One side of several pairs (or a golden's shots, ``item="shot"``), decoded and tiled:
    ``(B, H', W', 3)`` uint8. Errors name the item (``numbers``: each one's index) and the lighting."""
    size = (geometry.height, geometry.width)
    stacks = []
    for index, images in zip(numbers or range(len(items)), items, strict=True):
        decoded = []
        for light, data in zip(lights or (None,), images, strict=True):
            field = f"{side}.{light}" if light else side
            try:
                decoded.append(read_image(data, size, name=f"{field} of {item} {index}",
                                          allow_resize=allow_resize))
            except DataError as error:
                code = "wrong_image_size" if isinstance(error, ImageSizeError) else "undecodable_image"
                raise RequestError(422, code, error.message, pair=index, side=side, lighting=light) from None
        stacks.append(np.stack(decoded))
    if not stacks:
        height, width = geometry.input_shape[1:]
        return np.zeros((0, height, width, 3), np.uint8)
    return assemble(np.stack(stacks), geometry)
