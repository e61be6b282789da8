"""Request bodies of the inspection API: parsing, error codes and decoding (no Ray)."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from oi_ray.data.assemble import InputGeometry, read_pictures
from oi_ray.serving.uploads import (
    PairUpload,
    RequestError,
    UploadLayout,
    decode_pairs,
    golden_from_form,
    golden_from_json,
    pairs_from_form,
    pairs_from_json,
)

LIGHTS = ("WhiteLight", "SolderLight")
LAYOUT = UploadLayout(LIGHTS, max_pairs=3)
GEOMETRY = InputGeometry(num_lights=2, height=6, width=8, grid=None, mean=(0.5,) * 3, std=(0.25,) * 3)


def _png(value: int, size: tuple[int, int] = (8, 6)) -> bytes:
    pixels = np.full((size[1], size[0], 3), value, np.uint8)
    pixels[0, 0] = 255 - value  # not uniform, so a resize is visible
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _json_pair(pair_id=None, **images) -> dict:
    sides = {side: {light: base64.b64encode(images.get(f"{side}.{light}", _png(10 * i + (side == "golden"))))
                    .decode() for i, light in enumerate(LIGHTS)} for side in ("test", "golden")}
    return {"id": pair_id, **sides} if pair_id is not None else sides


def _error(call, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as caught:
        call(*args, **kwargs)
    return caught.value


def test_json_accepts_a_pair_a_list_and_a_pairs_object_in_lighting_order():
    single = pairs_from_json(json.dumps(_json_pair("a")).encode(), LAYOUT)
    listed = pairs_from_json(json.dumps([_json_pair(1), _json_pair("b")]).encode(), LAYOUT)
    wrapped = pairs_from_json(json.dumps({"pairs": [_json_pair()]}).encode(), LAYOUT)
    assert [pair.id for pair in single + listed + wrapped] == ["a", "1", "b", None]
    # lighting order is the model's, not the JSON object's
    reordered = _json_pair("r")
    reordered["test"] = dict(reversed(list(reordered["test"].items())))
    pair = pairs_from_json(json.dumps(reordered).encode(), LAYOUT)[0]
    assert pair.test == (_png(0), _png(10)) and pair.golden == (_png(1), _png(11))


def test_form_fields_with_and_without_pair_index():
    one = pairs_from_form([("id", "x"), ("test.WhiteLight", b"t0"), ("test.SolderLight", b"t1"),
                           ("golden.WhiteLight", b"g0"), ("golden.SolderLight", b"g1")], LAYOUT)
    assert one[0].id == "x" and one[0].test == (b"t0", b"t1") and one[0].golden == (b"g0", b"g1")
    fields = [(f"{i}.{side}.{light}", f"{i}{side}{light}".encode())
              for i in (1, 0) for side in ("test", "golden") for light in LIGHTS]
    two = pairs_from_form(fields + [("1.id", "second")], LAYOUT)
    assert [pair.id for pair in two] == [None, "second"]
    assert two[1].golden == (b"1goldenWhiteLight", b"1goldenSolderLight")


@pytest.mark.parametrize("body, status, code, where", [
    (b"{not json", 400, "malformed_json", {}),
    (b"[" * 100_000 + b"]" * 100_000, 400, "malformed_json", {}),  # deeper than the parser recurses
    (b"[]", 422, "no_pairs", {}),
    (json.dumps([_json_pair()] * 4).encode(), 413, "too_many_pairs", {}),
    (json.dumps({"pairs": [], "extra": 1}).encode(), 422, "unknown_field", {}),
    (json.dumps(["x"]).encode(), 422, "bad_pair", {"pair": 0}),
    (json.dumps({"test": {}, "golden": {}, "label": "PASS"}).encode(), 422, "unknown_field", {"pair": 0}),
])
def test_json_errors_have_status_code_and_place(body, status, code, where):
    error = _error(pairs_from_json, body, LAYOUT)
    assert (error.status, error.code) == (status, code)
    assert error.body()["error"].items() >= {"code": code, **where}.items()


def test_missing_extra_and_undecodable_lightings_are_named():
    pair = _json_pair()
    del pair["golden"]["SolderLight"]
    error = _error(pairs_from_json, json.dumps([_json_pair(), pair]).encode(), LAYOUT)
    assert (error.status, error.code, error.where) == (422, "missing_image",
                                                       {"pair": 1, "side": "golden", "lighting": "SolderLight"})
    assert "expected test.WhiteLight, test.SolderLight, golden.WhiteLight, golden.SolderLight" in error.message

    pair = _json_pair()
    pair["test"]["UVLight"] = pair["test"]["WhiteLight"]
    error = _error(pairs_from_json, json.dumps(pair).encode(), LAYOUT)
    assert (error.code, error.where["lighting"]) == ("unknown_lighting", "UVLight")

    pair = _json_pair()
    pair["test"]["SolderLight"] = "***"
    error = _error(pairs_from_json, json.dumps(pair).encode(), LAYOUT)
    assert (error.code, error.where) == ("bad_image", {"pair": 0, "side": "test", "lighting": "SolderLight"})

    error = _error(pairs_from_form, [("test.WhiteLight", "text, not a file")], LAYOUT)
    assert error.code == "bad_image"
    error = _error(pairs_from_form, [("0.test.WhiteLight", b"x"), ("test.SolderLight", b"y")], LAYOUT)
    assert error.code == "bad_field"


def test_decoding_matches_the_file_pipeline_and_refuses_bad_images(tmp_path):
    images = {name: _png(value) for name, value in (("t0", 10), ("t1", 20), ("g0", 11), ("g1", 21))}
    for name, data in images.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    pairs = pairs_from_form([(f"{side}.{light}", images[f"{side[0]}{i}"]) for side in ("test", "golden")
                             for i, light in enumerate(LIGHTS)], LAYOUT)
    test, golden = decode_pairs(pairs, GEOMETRY, LIGHTS, allow_resize=True)
    from_files = read_pictures([[str(tmp_path / "t0.png"), str(tmp_path / "t1.png")]], GEOMETRY)
    assert test.shape == (1, 12, 8, 3) and np.array_equal(test, from_files)
    assert np.array_equal(golden, read_pictures([[str(tmp_path / "g0.png"), str(tmp_path / "g1.png")]], GEOMETRY))

    truncated = PairUpload(None, (images["t0"][:-12], images["t1"]), pairs[0].golden)
    error = _error(decode_pairs, [pairs[0], truncated], GEOMETRY, LIGHTS, allow_resize=True)
    assert (error.status, error.code, error.where) == (422, "undecodable_image",
                                                       {"pair": 1, "side": "test", "lighting": "WhiteLight"})
    assert "truncated PNG" in error.message

    larger = PairUpload(None, pairs[0].test, (images["g0"], _png(3, size=(16, 12))))
    _, resized = decode_pairs([larger], GEOMETRY, LIGHTS, allow_resize=True)
    assert resized.shape == (1, 12, 8, 3) and not np.array_equal(resized, golden)
    error = _error(decode_pairs, [larger], GEOMETRY, LIGHTS, allow_resize=False)
    assert (error.code, error.where["lighting"]) == ("wrong_image_size", "SolderLight")
    assert "is 16x12 pixels; the model takes 8x6" in error.message


def test_a_pair_may_name_a_registered_golden_instead_of_uploading_it():
    named = {"id": "n", "golden_id": "C12", "test": _json_pair()["test"]}
    pairs = pairs_from_json(json.dumps([_json_pair("u"), named]).encode(), LAYOUT)
    assert [(pair.golden_id, len(pair.golden)) for pair in pairs] == [(None, 2), ("C12", 0)]
    form = pairs_from_form([("golden_id", "0603-10k"), ("test.WhiteLight", b"t0"), ("test.SolderLight", b"t1")],
                           LAYOUT)
    assert (form[0].golden_id, form[0].test, form[0].golden) == ("0603-10k", (b"t0", b"t1"), ())
    test, golden = decode_pairs(pairs, GEOMETRY, LIGHTS, allow_resize=False)
    assert test.shape == (2, 12, 8, 3) and golden.shape == (1, 12, 8, 3)  # only the uploaded golden
    both = {**_json_pair(), "golden_id": "C12"}
    assert _error(pairs_from_json, json.dumps(both).encode(), LAYOUT).code == "bad_pair"
    error = _error(pairs_from_json, json.dumps({**named, "golden_id": "../C12"}).encode(), LAYOUT)
    assert (error.status, error.code, error.where) == (422, "bad_golden_id", {"pair": 0})


def test_a_golden_body_holds_one_shot_or_a_set_in_lighting_order():
    shot = _json_pair()["golden"]
    assert golden_from_json(json.dumps({"golden": shot}).encode(), LAYOUT) == [(_png(1), _png(11))]
    assert len(golden_from_json(json.dumps({"golden": [shot, shot]}).encode(), LAYOUT)) == 2
    fields = [("1.golden.SolderLight", b"b1"), ("0.golden.WhiteLight", b"a0"), ("0.golden.SolderLight", b"a1"),
              ("1.golden.WhiteLight", b"b0")]
    assert golden_from_form(fields, LAYOUT) == [(b"a0", b"a1"), (b"b0", b"b1")]
    assert golden_from_form([("golden.WhiteLight", b"w"), ("golden.SolderLight", b"s")], LAYOUT) == [(b"w", b"s")]


@pytest.mark.parametrize("call, body, status, code", [
    (golden_from_json, json.dumps({"pairs": []}).encode(), 422, "bad_golden"),
    (golden_from_json, json.dumps({"golden": []}).encode(), 422, "bad_golden"),
    (golden_from_json, json.dumps({"golden": [{"WhiteLight": ""}] * 4}).encode(), 413, "too_many_shots"),
    (golden_from_json, json.dumps({"golden": {"WhiteLight": base64.b64encode(b"x").decode()}}).encode(), 422,
     "missing_image"),
    (golden_from_form, [("test.WhiteLight", b"t")], 422, "unknown_field"),
    (golden_from_form, [("golden.WhiteLight", "text")], 422, "bad_image"),
    (golden_from_form, [("golden.WhiteLight", b"w"), ("golden.UVLight", b"u")], 422, "unknown_lighting"),
    (golden_from_form, [("golden.WhiteLight", b"w"), ("1.golden.WhiteLight", b"x")], 422, "bad_field"),
    (golden_from_form, [("0.golden.WhiteLight", b"w"), ("2.golden.WhiteLight", b"x")], 422, "bad_field"),
])
def test_golden_bodies_that_cannot_be_kept_are_refused(call, body, status, code):
    error = _error(call, body, LAYOUT)
    assert (error.status, error.code) == (status, code), error.message
