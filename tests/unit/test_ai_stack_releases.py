"""roles/ai_stack/filter_plugins: the release history, rollback targets and image pruning."""

import importlib.util
import json
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ai_stack_filters_releases",
                                               PROJECT / "roles/ai_stack/filter_plugins/ai_stack.py")
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)

REG = "ai-lab-registry:5000/ai-system/agent"
SHA = {name: (name * 40)[:40] for name in ("a", "b", "c", "d")}


def record(index, name, now, keep=3, images=None):
    plan = filters.ai_stack_release_plan(index, SHA[name], images or {f"{REG}:{name}": f"sha256:{name}"}, now, keep)
    return plan


def history(*names, keep=3):
    index = {}
    for second, name in enumerate(names):
        index = record(index, name, f"20260101T00000{second}Z", keep)["index"]
    return index


def test_first_release_is_created_and_current():
    plan = record({}, "a", "20260101T000000Z")
    assert plan["create"] == f"20260101T000000Z-{SHA['a'][:12]}"
    assert plan["remove"] == []
    assert plan["index"]["current"] == plan["create"]
    assert plan["index"]["releases"][0]["images"] == {f"{REG}:a": "sha256:a"}
    assert filters.RELEASE_ID.match(plan["create"])


def test_same_compose_file_makes_no_new_release():
    index = history("a")
    plan = record(json.dumps(index), "a", "20260102T000000Z")
    assert plan["create"] == "" and plan["remove"] == []
    assert plan["index"] == filters.ai_stack_release_index(index)


def test_only_the_newest_n_are_kept_and_ids_sort_by_time():
    index = history("a", "b", "c")
    plan = record(index, "d", "20260101T000009Z")
    ids = [r["id"] for r in plan["index"]["releases"]]
    assert ids == sorted(ids) and len(ids) == 3
    assert plan["remove"] == [index["releases"][0]["id"]]
    assert plan["index"]["current"] == ids[-1] == plan["create"]


def test_a_release_already_kept_becomes_current_again_without_a_new_one():
    index = history("a", "b")
    plan = record(index, "a", "20260101T000009Z")
    assert plan["create"] == "" and plan["remove"] == []
    assert plan["index"]["current"] == index["releases"][0]["id"]


def test_the_current_release_is_never_dropped():
    index = history("a", "b", "c", keep=3)
    plan = record(index, "a", "20260101T000009Z", keep=2)
    kept = [r["id"] for r in plan["index"]["releases"]]
    assert index["releases"][0]["id"] in kept and index["releases"][2]["id"] in kept and len(kept) == 2
    plan = record(index, "a", "20260101T000009Z", keep=1)
    assert [r["id"] for r in plan["index"]["releases"]] == [index["releases"][0]["id"]]


@pytest.mark.parametrize("keep", [0, -1, "0"])
def test_a_count_below_one_is_refused(keep):
    with pytest.raises(ValueError, match="at least 1"):
        record({}, "a", "20260101T000000Z", keep=keep)


def test_a_corrupt_or_missing_index_reads_as_empty():
    assert filters.ai_stack_release_index("") == {"releases": [], "current": ""}
    assert filters.ai_stack_release_index("{not json") == {"releases": [], "current": ""}
    assert filters.ai_stack_release_index({"releases": [{"id": "../../etc"}], "current": "x"}) == \
        {"releases": [], "current": ""}


def test_select_previous_and_by_id():
    index = history("a", "b", "c")
    ids = [r["id"] for r in index["releases"]]
    assert filters.ai_stack_release_select(index, "previous")["release"]["id"] == ids[1]
    assert filters.ai_stack_release_select(index, ids[0]) == {"release": index["releases"][0], "error": ""}
    # After a rollback to the middle one, "previous" is the one before it.
    moved = dict(index, current=ids[1])
    assert filters.ai_stack_release_select(moved, "previous")["release"]["id"] == ids[0]
    first = dict(index, current=ids[0])
    assert "No release before the current one on pc2" in filters.ai_stack_release_select(first, "previous", "pc2")["error"]


def test_select_refuses_unknown_ids_and_empty_histories():
    index = history("a")
    missing = filters.ai_stack_release_select(index, "20990101T000000Z-deadbeefdead", "ai-lab-pc2")
    assert missing["release"] == {}
    assert "Release 20990101T000000Z-deadbeefdead does not exist on ai-lab-pc2" in missing["error"]
    assert index["releases"][0]["id"] + " (current)" in missing["error"]
    assert "No release is recorded" in filters.ai_stack_release_select({}, "previous")["error"]
    assert "set -e release" in filters.ai_stack_release_select(index, "")["error"]
    assert "No release before" in filters.ai_stack_release_select(index, "previous")["error"]


def test_release_images_union():
    index = history("a", "b")
    assert filters.ai_stack_release_images(index, {f"{REG}:c": ""}) == {
        f"{REG}:a": "sha256:a", f"{REG}:b": "sha256:b", f"{REG}:c": ""}


def image(id_, tags=(), digests=()):
    return {"Id": id_, "RepoTags": list(tags), "RepoDigests": list(digests)}


def test_prune_removes_only_unreferenced_unused_images_of_the_stack():
    info = {
        "images": [
            image("sha256:1", [f"{REG}:lab"], [f"{REG}@sha256:lab"]),
            image("sha256:2", [f"{REG}:lab-next"], [f"{REG}@sha256:next"]),
            image("sha256:3", [f"{REG}:lab-broken"], [f"{REG}@sha256:broken"]),
            image("sha256:4", ["ai-system/network-anchor:1"]),
            image("sha256:5", ["debian:12"]),
            image("sha256:6", [], [f"{REG}@sha256:old"]),           # a tag that moved
            image("sha256:7", [], [f"{REG}@sha256:kept-digest"]),   # referenced by digest
            image("sha256:8", [f"{REG}:stopped"]),                  # a stopped container uses it
            image("sha256:9", ["<none>:<none>"], ["<none>@<none>"]),
        ],
        "containers": [{"Image": f"{REG}:lab", "ImageID": "sha256:1"}, {"Image": "x", "ImageID": "sha256:8"}],
    }
    referenced = {f"{REG}:lab": "sha256:lab", f"{REG}:gone": "sha256:kept-digest"}
    assert filters.ai_stack_images_to_prune(info, referenced, ["ai-system/network-anchor"]) == [
        f"{REG}:lab-next", f"{REG}:lab-broken", "sha256:6"]


def test_prune_never_touches_the_anchor_even_when_it_shares_the_repository_list():
    info = {"images": [image("sha256:4", ["ai-system/network-anchor:1"])], "containers": []}
    assert filters.ai_stack_images_to_prune(info, {"ai-system/network-anchor:2": ""}, ["ai-system/network-anchor"]) == []


def test_prune_untags_an_unreferenced_tag_of_an_image_still_needed():
    shared = image("sha256:1", [f"{REG}:lab", f"{REG}:lab-next"], [f"{REG}@sha256:lab"])
    used = image("sha256:2", [f"{REG}:old", f"{REG}:older"])
    info = {"images": [shared, used], "containers": [{"Image": f"{REG}:old", "ImageID": "sha256:2"}]}
    assert filters.ai_stack_images_to_prune(info, {f"{REG}:lab": "sha256:lab"}) == [f"{REG}:lab-next", f"{REG}:older"]
    # Needed by id or digest only, with no tag to keep: left as it is.
    info = {"images": [image("sha256:3", [f"{REG}:x"], [f"{REG}@sha256:kept"])], "containers": []}
    assert filters.ai_stack_images_to_prune(info, {f"{REG}:lab": "sha256:kept"}) == []


def test_prune_keeps_an_image_that_also_carries_a_foreign_tag_and_only_untags_the_stack_s_tags():
    # day2 (test_6 loads ai-system/agent:lab-next, test_9b prunes lab-next): the image is the
    # same as the registry's lab and lab-next; only the unreferenced registry tag goes.
    loaded = image("sha256:1", [f"{REG}:lab", f"{REG}:lab-next", "ai-system/agent:lab-next"], [f"{REG}@sha256:lab"])
    info = {"images": [loaded], "containers": []}
    assert filters.ai_stack_images_to_prune(info, {f"{REG}:lab": "sha256:lab"}) == [f"{REG}:lab-next"]
    # Nothing of it referenced: its stack tags go, the image stays under its other tag.
    info = {"images": [image("sha256:1", [f"{REG}:old", "mirror.example/agent:old"])], "containers": []}
    assert filters.ai_stack_images_to_prune(info, {f"{REG}:lab": ""}) == [f"{REG}:old"]
    # A used tag stays; an image with no tag of the stack is not looked at.
    info = {"images": [image("sha256:1", [f"{REG}:old", "mirror.example/agent:old"]),
                       image("sha256:2", ["mirror.example/agent:x"], [f"{REG}@sha256:z"])],
            "containers": [{"Image": f"{REG}:old", "ImageID": "sha256:1"}]}
    assert filters.ai_stack_images_to_prune(info, {f"{REG}:lab": ""}) == []


def test_prune_with_nothing_referenced_removes_nothing():
    info = {"images": [image("sha256:1", [f"{REG}:lab"])], "containers": []}
    assert filters.ai_stack_images_to_prune(info, {}) == []


def test_filters_are_registered():
    names = filters.FilterModule().filters()
    for name in ("ai_stack_release_index", "ai_stack_release_plan", "ai_stack_release_select",
                 "ai_stack_release_images", "ai_stack_images_to_prune"):
        assert name in names
