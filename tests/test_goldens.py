"""The golden library's store on a local folder (the same pyarrow filesystem calls as a bucket)."""

import concurrent.futures
import io

import numpy as np
import pytest
from PIL import Image

from oi_ray.data.assemble import InputGeometry
from oi_ray.feature_cache import FeatureCache
from oi_ray.serving.golden_stats import GoldenStats
from oi_ray.serving.goldens import GoldenIdError, GoldenStore, check_golden_id
from oi_ray.serving.library import GoldenLibrary

LIGHTS = ("WhiteLight", "SolderLight")


def _shot(tag: str) -> tuple[bytes, ...]:
    return tuple(f"{tag}-{light}".encode() for light in LIGHTS)


def test_a_golden_set_is_kept_whole_and_read_back_in_lighting_order(tmp_path):
    store = GoldenStore(str(tmp_path / "goldens"))
    golden = store.put("C12", LIGHTS, [_shot("a"), _shot("b")])
    assert (golden.id, golden.shots, golden.lights) == ("C12", 2, LIGHTS)
    again = GoldenStore(str(tmp_path / "goldens")).get("C12")  # another replica, the same store
    assert again == golden
    assert store.images(again) == [_shot("a"), _shot("b")]
    assert store.get("C13") is None


def test_replacing_a_golden_leaves_only_the_new_version(tmp_path):
    store = GoldenStore(str(tmp_path))
    first = store.put("0603-10k", LIGHTS, [_shot("old")])
    second = store.put("0603-10k", LIGHTS, [_shot("new")])
    assert second.version != first.version and store.images(store.get("0603-10k")) == [_shot("new")]
    assert {path.name for path in (tmp_path / "0603-10k").iterdir()} == {"golden.json", second.version}


def test_features_are_kept_per_model(tmp_path):
    store = GoldenStore(str(tmp_path))
    golden = store.put("R1", LIGHTS, [_shot("a")])
    features = np.arange(12, dtype=np.float32).reshape(2, 6)
    assert store.features(golden, "sha-a") is None
    store.keep_features(golden, "sha-a", features)
    np.testing.assert_array_equal(store.features(golden, "sha-a"), features)
    assert store.features(golden, "sha-b") is None  # another model computes its own


def test_ids_are_listed_in_pages_and_deleted_at_once(tmp_path):
    store = GoldenStore(str(tmp_path))
    for golden_id in ("C3", "C1", "C2", "U7"):
        store.put(golden_id, LIGHTS, [_shot(golden_id)])
    (tmp_path / "C0" / "halfway").mkdir(parents=True)  # an upload that has not written its manifest
    assert store.ids(limit=2) == ["C1", "C2"]
    assert store.ids(after="C2", limit=2) == ["C3", "U7"]
    assert store.delete("C2") and not store.delete("C2")
    assert store.ids() == ["C1", "C3", "U7"] and not (tmp_path / "C2").exists()


def test_two_uploads_of_one_id_at_once_leave_one_whole_golden(tmp_path):
    store = GoldenStore(str(tmp_path))
    uploads = {f"v{index}": [_shot(f"v{index}-{shot}") for shot in range(3)] for index in range(8)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda shots: store.put("C12", LIGHTS, shots), uploads.values()))
    kept = store.images(store.get("C12"))
    assert kept in uploads.values()  # all three shots of one upload, never a mix


@pytest.mark.parametrize("golden_id", ["", ".", "..", "a/b", "../C12", "C 12", "-C12", "x" * 129, "C12\n"])
def test_an_id_that_is_not_one_safe_path_segment_is_refused(golden_id, tmp_path):
    with pytest.raises(GoldenIdError, match="is not a part reference"):
        check_golden_id(golden_id)
    with pytest.raises(GoldenIdError):
        GoldenStore(str(tmp_path)).put(golden_id, LIGHTS, [_shot("a")])


def test_the_feature_cache_holds_its_bound_under_a_stream_of_distinct_goldens():
    cache = FeatureCache(max_bytes=10 * 4_000)  # ten goldens of 1,000 float32 features
    for index in range(100):
        cache.put(f"C{index}", np.full(1_000, index, np.float32))
        assert cache.bytes <= cache.max_bytes
        if index == 50:
            assert cache.get("C45") is not None  # used now: it outlives goldens added after it
        if index == 59:
            assert cache.get("C50") is None and cache.get("C45") is not None
    assert len(cache) == 10 and cache.bytes == 40_000
    assert cache.get("C89") is None and cache.get("C90")[0] == 90 and cache.get("C45") is None
    cache.put("huge", np.zeros(20_000, np.float32))  # larger than the bound: not kept, nothing dropped
    assert cache.get("huge") is None and len(cache) == 10
    cache.discard("C99")
    assert cache.get("C99") is None and cache.bytes == 36_000


def test_statistics_of_several_replicas_are_merged_from_the_store(tmp_path):
    store = GoldenStore(str(tmp_path))
    store.put("C12", LIGHTS, [_shot("a")])
    first, second = (GoldenStats(store, replica, bounds=[0.5, 1.0], flush_s=0.0) for replica in ("r1", "r2"))
    first.record("C12", np.array([0.2, 0.7]), np.array(["PASS", "NO_PASS"]))
    first.flush()
    second.record("C12", np.array([1.5]), np.array(["NO_PASS"]))  # not written yet: its own tally counts
    answer = second.answer("C12")
    assert (answer["pairs"], answer["no_pass"], answer["replicas"]) == (3, 2, 2)
    assert answer["histogram"] == {"upper_bounds": [0.5, 1.0], "counts": [1, 1, 1]}
    assert answer["mean_distance"] == pytest.approx(0.8) and answer["no_pass_rate"] == pytest.approx(2 / 3)
    assert first.answer("C12")["pairs"] == 2  # the second replica's tally is not in the store yet
    second.flush()
    assert first.answer("C12")["pairs"] == 3


class _CountingHalves:
    """An embed half that gives each picture its mean as its one feature, and counts the pictures."""

    def __init__(self) -> None:
        self.pictures = 0

    def embed(self, pictures: np.ndarray) -> np.ndarray:
        self.pictures += len(pictures)
        return pictures.reshape(len(pictures), -1).mean(axis=1, keepdims=True, dtype=np.float32)


def _png_shot(value: int) -> tuple[bytes, ...]:
    shot = []
    for _ in LIGHTS:
        buffer = io.BytesIO()
        Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(buffer, format="PNG")
        shot.append(buffer.getvalue())
    return tuple(shot)


def test_a_new_model_embeds_the_kept_images_once_at_start_and_the_same_model_reads_its_features(tmp_path):
    geometry = InputGeometry(num_lights=len(LIGHTS), height=6, width=8, grid=None, mean=(0.5,) * 3, std=(0.25,) * 3)

    def library(model_sha256: str) -> tuple[GoldenLibrary, _CountingHalves]:
        halves = _CountingHalves()
        return GoldenLibrary(GoldenStore(str(tmp_path / "goldens")), halves, model_sha256, geometry, LIGHTS,
                             cache_bytes=2**20, allow_resize=False), halves

    first, first_halves = library("a" * 64)
    for index, value in enumerate((10, 20, 30)):
        first.register(f"G{index}", [_png_shot(value)])
    assert first_halves.pictures == 3 and first.embedded == 0
    same, same_halves = library("a" * 64)  # a replica of the same model: features read from the store
    assert same.warm() == 3 and same.embedded == 0 and same_halves.pictures == 0
    new, new_halves = library("b" * 64)  # a new model: every golden embedded again from its images, once
    assert new.warm() == 3 and new.embedded == 3 and new_halves.pictures == 3
    np.testing.assert_array_equal(new.kept("G1").features, first.kept("G1").features)
    assert library("b" * 64)[0].warm() == 3, "and kept for the next replica of the new model"
    assert new_halves.pictures == 3
