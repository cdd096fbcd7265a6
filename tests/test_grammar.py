import pytest

from raycap.data.grammar import Mention, analyse, caption_checks, multi_object, parse, wellformed
from raycap.data.world import Obj, Scene

SCENE = Scene((Obj("star", "green", "large", 0, 0), Obj("circle", "red", "small", 2, 1)))


def test_parse_full_partial_and_generic():
    assert parse("a large green star at top left and a small red circle at bottom") == (
        Mention("star", "green", "large", "top left"), Mention("circle", "red", "small", "bottom"))
    assert parse("a shape") == (Mention(),)
    assert parse("an orange square at center") == (Mention("square", "orange", None, "center"),)
    assert parse("some shapes") == ()
    assert parse("a red circle .") == (Mention("circle", "red"),)


@pytest.mark.parametrize("caption", [
    "", "a", "red circle", "a red", "a circle at", "a circle at middle", "an red circle", "a orange circle",
    "a circle and", "a circle a square", "a red red circle", "a circle at top left left",
    "a small blue triangle blue triangle blue triangle small blue", "shapes some"])
def test_parse_rejects_what_is_not_in_the_grammar(caption):
    assert parse(caption) is None


def test_word_salad_fails_wellformed_and_counts_as_repetition():
    salad = "a small blue triangle blue triangle blue triangle small blue"
    r = analyse(salad, SCENE)
    assert not r.wellformed and not r.faithful and r.repetition
    assert wellformed([salad, "a red circle"]) == 0.5


def test_attribute_swap_is_wellformed_but_not_faithful():
    swapped = "a large red star at top left and a small green circle at bottom"
    r = analyse(swapped, SCENE)
    assert r.wellformed and not r.faithful
    assert (r.n_claims, r.n_true) == (8, 6)
    ok = analyse("a large green star at top left and a small red circle at bottom", SCENE)
    assert ok.faithful and ok.n_true == ok.n_facts == 8


def test_binding_needs_distinct_objects():
    # two mentions cannot both be bound to the one green star
    assert not analyse("a green star and a green shape", SCENE).faithful
    assert analyse("a green star and a red shape", SCENE).faithful
    assert not analyse("a star and a circle and a shape", SCENE).faithful  # more mentions than objects
    assert analyse("a red circle and a green star", SCENE).faithful  # order does not matter


def test_checks_values_by_hand():
    caps = ["a green star", "a large red star at top left", "word salad here", "some shapes",
            "a red circle and a red circle"]
    checks = caption_checks(caps, [SCENE] * 5)
    assert checks["wellformed"] == pytest.approx(4 / 5)
    # claims: 2 true | 4 claims, 3 true (red is wrong) | - | none | 2+2 claims, 2 true (one circle only)
    assert checks["precision"] == pytest.approx((2 + 3 + 2) / (2 + 4 + 4))
    assert checks["recall"] == pytest.approx((2 + 3 + 2) / (8 * 5))
    assert checks["faithful"] == pytest.approx(2 / 5)  # "a green star" and the generic caption
    assert checks["repetition"] == pytest.approx(1 / 5)  # the object stated twice
    assert checks["multi_object"] == multi_object(caps) == pytest.approx(1 / 5)


def test_word_verdicts_mark_the_false_claims_on_their_words():
    from raycap.data.grammar import word_verdicts

    # the star is green and at top left: "red" and "bottom" are wrong for the mention bound to it
    words = word_verdicts("a large red star at top left and a small red circle at bottom", SCENE)
    assert [v for _, v in words] == ["", "true", "false", "true", "", "true", "true", "",
                                     "", "true", "true", "true", "", "true"]
    swapped = word_verdicts("a large red star at top left and a small green circle at bottom", SCENE)
    assert [w for w, v in swapped if v == "false"] == ["red", "green"]
    assert [w for w, v in word_verdicts("a green star at bottom .", SCENE) if v == "false"] == ["bottom"]
    # a third mention has no object left: its claims are false, the noun "shape" claims nothing
    third = word_verdicts("a star and a circle and a blue shape", SCENE)
    assert [(w, v) for w, v in third if v] == [("star", "true"), ("circle", "true"), ("blue", "false")]
    assert word_verdicts("some shapes", SCENE) == [("some", ""), ("shapes", "")]
    assert word_verdicts("circle red a", SCENE) == [("circle", "unparsed"), ("red", "unparsed"), ("a", "unparsed")]


def test_faithfulness_by_objects_claims_and_first_mention_on_a_hand_made_example():
    one = Scene((Obj("square", "blue", "small", 1, 1),))
    three = Scene((Obj("star", "green", "large", 0, 0), Obj("circle", "red", "small", 2, 1),
                   Obj("cross", "white", "large", 0, 2)))
    captions = [
        "a small blue square at center",                        # 1 object: faithful, 4 claims, first true
        "a large green star and a large green cross",           # 2 objects: first true, second false -> unfaithful
        "a small red circle and a large green star",            # 2 objects: faithful (the binding is per object)
        "some shapes",                                          # 3 objects: generic, faithful, no mention
        "a red star at top left and a large white cross",       # 3 objects: first false (the star is green)
        "a red a red",                                          # not in the grammar
    ]
    scenes = [one, SCENE, SCENE, three, three, three]
    m = caption_checks(captions, scenes)
    assert m["faithful_1obj"] == 1.0 and m["faithful_2obj"] == 0.5 and m["faithful_3obj"] == 1 / 3
    # claims of the five well-formed captions: 4, 6, 6, 0, 6
    assert m["claims_per_caption"] == pytest.approx(22 / 5)
    # first mentions of the four captions that name an object: true, true, true, false
    assert m["first_mention_faithful"] == 0.75
    assert m["faithful"] == pytest.approx(3 / 6)
