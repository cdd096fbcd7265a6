"""CHAIR (Rohrbach et al., EMNLP 2018): object hallucination of captions on COCO images.

CHAIR-i = hallucinated object mentions / all object mentions; CHAIR-s = captions with at least one hallucinated
object / all captions. A caption's objects are the COCO categories its words name through `SYNONYMS` (a table
written for raycap: each of the 80 categories with the words people use for it; longest phrase first, so "hot
dog" is food and "teddy bear" a toy, plurals folded); each category counts once per caption. An image's ground
truth is the categories of its instance annotations, joined (as in the paper) by those its reference captions
name. Words that are mostly something else in captions are left out on purpose: "orange" is read as the fruit
only in the plural ("oranges") or as "orange slice"; "glass", "board", "bag", "plant" and "baseball" alone name
no category.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from raycap.errors import UserError

SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("person", "people", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "lady",
               "guy", "gentleman", "adult", "teenager", "teen", "player", "skier", "surfer", "skateboarder",
               "snowboarder", "rider", "biker", "cyclist", "pedestrian", "tourist", "chef", "worker", "officer",
               "policeman", "soldier", "athlete", "catcher", "umpire", "spectator", "passenger", "crowd", "family"),
    "bicycle": ("bicycle", "bike", "mountain bike"),
    "car": ("car", "automobile", "sedan", "taxi", "suv", "jeep", "minivan", "van"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "scooter", "moped", "dirt bike"),
    "airplane": ("airplane", "plane", "aeroplane", "jet", "airliner", "aircraft", "jetliner"),
    "bus": ("bus", "double decker"),
    "train": ("train", "locomotive", "tram", "streetcar", "trolley"),
    "truck": ("truck", "pickup truck", "lorry", "fire truck", "firetruck", "semi"),
    "boat": ("boat", "ship", "sailboat", "kayak", "canoe", "yacht", "ferry", "raft", "rowboat", "speedboat"),
    "traffic light": ("traffic light", "traffic signal", "stop light", "stoplight", "street light"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter",),
    "bench": ("bench", "park bench"),
    "bird": ("bird", "pigeon", "seagull", "gull", "duck", "goose", "parrot", "sparrow", "swan", "eagle", "owl",
             "hawk", "crow", "pelican", "finch", "robin"),
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy", "pup", "poodle", "terrier", "labrador", "bulldog", "beagle", "retriever", "husky"),
    "horse": ("horse", "pony", "foal", "stallion", "mare"),
    "sheep": ("sheep", "lamb"),
    "cow": ("cow", "cattle", "bull", "calf", "ox", "heifer"),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly", "polar bear", "cub"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "rucksack", "knapsack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "purse", "hand bag", "pocketbook"),
    "tie": ("tie", "necktie", "bow tie"),
    "suitcase": ("suitcase", "luggage", "briefcase"),
    "frisbee": ("frisbee", "flying disc"),
    "skis": ("skis", "pair of skis"),
    "snowboard": ("snowboard",),
    "sports ball": ("ball", "soccer ball", "tennis ball", "football", "basketball", "volleyball", "softball",
                    "beach ball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "glove", "mitt"),
    "skateboard": ("skateboard", "skate board"),
    "surfboard": ("surfboard", "surf board"),
    "tennis racket": ("tennis racket", "racket", "racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass", "wineglass"),
    "cup": ("cup", "mug", "teacup", "coffee cup"),
    "fork": ("fork",),
    "knife": ("knife",),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "cheeseburger", "sub sandwich", "panini"),
    "orange": ("oranges", "orange slice", "tangerine", "mandarin"),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake"),
    "chair": ("chair", "armchair", "recliner"),
    "couch": ("couch", "sofa", "loveseat"),
    "potted plant": ("potted plant", "houseplant", "house plant", "flower pot", "flowerpot", "plant pot"),
    "bed": ("bed",),
    "dining table": ("table", "dining table", "kitchen table"),
    "toilet": ("toilet",),
    "tv": ("tv", "television", "monitor", "flat screen"),
    "laptop": ("laptop", "laptop computer", "notebook computer"),
    "mouse": ("mouse", "computer mouse"),
    "remote": ("remote", "remote control", "controller"),
    "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "cellphone", "phone", "smartphone", "mobile phone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stove"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddy", "stuffed animal", "stuffed bear"),
    "hair drier": ("hair drier", "hair dryer", "hairdryer", "blow dryer"),
    "toothbrush": ("toothbrush", "tooth brush"),
}
COCO_CATEGORIES = tuple(SYNONYMS)
IRREGULAR = {"people": "people", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
             "knives": "knife", "geese": "goose", "oxen": "ox", "calves": "calf", "teddies": "teddy",
             "skis": "skis", "scissors": "scissors", "sheep": "sheep", "cattle": "cattle", "oranges": "oranges",
             "gentlemen": "gentleman", "policemen": "policeman", "ladies": "lady", "bus": "bus", "buses": "bus",
             "busses": "bus", "glasses": "glasses", "species": "species"}
PHRASES: dict[tuple[str, ...], str] = {tuple(p.split()): c for c, words in SYNONYMS.items() for p in words}
HEAD_WORDS = {p[-1] for p in PHRASES}
LONGEST = max(len(p) for p in PHRASES)


def singular(word: str) -> str:
    """The form of `word` the table lists: irregular plurals, then -ies, -es and -s stripped when that gives a
    word of the table."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word in HEAD_WORDS:
        return word
    for suffix, repl in (("ies", "y"), ("ves", "fe"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and word[: len(word) - len(suffix)] + repl in HEAD_WORDS:
            return word[: len(word) - len(suffix)] + repl
    return word


def words_of(caption: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", caption.lower())


def mentioned_objects(caption: str) -> set[str]:
    """The COCO categories a caption names (longest phrase first, each word used once)."""
    words = [singular(w) for w in words_of(caption)]
    found, i = set(), 0
    while i < len(words):
        for n in range(min(LONGEST, len(words) - i), 0, -1):
            category = PHRASES.get(tuple(words[i:i + n]))
            if category is not None:
                found.add(category)
                i += n
                break
        else:
            i += 1
    return found


def read_instances(path: Path) -> dict[str, set[str]]:
    """{image id: the category names of its instances} from a COCO instances file (`instances_val2014.json`); every
    image the file lists is present, those without instances with an empty set."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--instances {path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"--instances {path}: not valid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise UserError(f"--instances {path}: missing the '{key}' list of a COCO instances file")
    names = {}
    for k, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or c.get("name") not in SYNONYMS:
            raise UserError(f"--instances {path}: categories[{k}] is not one of the 80 COCO categories CHAIR knows "
                            f"({c.get('name') if isinstance(c, dict) else c!r})")
        names[c["id"]] = c["name"]
    objects = {}
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im:
            raise UserError(f"--instances {path}: images[{k}] has no 'id'")
        objects[str(im["id"])] = set()
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or str(a.get("image_id")) not in objects or a.get("category_id") not in names:
            raise UserError(f"--instances {path}: annotations[{k}] needs an image_id of its images and a "
                            "category_id of its categories")
        objects[str(a["image_id"])].add(names[a["category_id"]])
    return objects


def chair(captions: Sequence[str], truth: Sequence[Iterable[str]]) -> dict:
    """CHAIR-i and CHAIR-s of captions against each image's ground-truth categories, with the counts."""
    if len(captions) != len(truth):
        raise ValueError(f"{len(captions)} captions for {len(truth)} ground-truth sets")
    mentioned = hallucinated = with_hallucination = 0
    for caption, objects in zip(captions, truth):
        named = mentioned_objects(caption)
        wrong = named - set(objects)
        mentioned += len(named)
        hallucinated += len(wrong)
        with_hallucination += bool(wrong)
    return {"chair_i": hallucinated / mentioned if mentioned else 0.0,
            "chair_s": with_hallucination / len(captions) if captions else 0.0,
            "chair_mentions": mentioned, "chair_hallucinated": hallucinated}


def chair_truth(ids: Sequence[str], instances: dict[str, set[str]], references: Sequence[Sequence[str]] | None,
                where: str) -> list[set[str]]:
    """Each image's ground truth: its instance categories, and those its references name."""
    missing = [i for i in ids if i not in instances]
    if missing:
        raise UserError(f"{where}: image id {missing[0]!r} is not in the instances file ({len(missing)} of "
                        f"{len(ids)} images are not); give the instances file of the same COCO images")
    truth = [set(instances[i]) for i in ids]
    if references is not None:
        for objects, refs in zip(truth, references):
            for r in refs:
                objects |= mentioned_objects(r)
    return truth
