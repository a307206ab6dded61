"""Procedural driving scenes: a three-lane road seen from above, the ego car at the
bottom of the middle lane, one key object of a CODA-LM category and a few others.

Questions come at the three levels of the `driving` taxonomy; the right plan
follows from what is perceived (category, lane, distance) and predicted
(motion), so planning cannot be answered without the earlier levels.

The general kinds (`GENERAL_KINDS`: describe the scene, locate an object, say
whether a category is there, count objects, locate what a red rectangle marks,
name the colour of the object in a rectangle or a lane, repeat a phrase) are
off unless a weight switches them on (`mose world generate --general`): they
are the generic visual question answering a general VLM knows before it meets
this benchmark, and what `mose demo` pretrains its tiny model on. None asks a
benchmark question, but they come close on purpose: each category has one
colour, so naming the colour in a rectangle is naming the object in other
words, and "repeat after me" makes the model able to say the answers' phrases.
What fine-tuning must learn is the benchmark's words for what the model sees,
how objects will move and what the ego vehicle should do.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image, ImageDraw

from mose.data.schema import Sample
from mose.data.world.common import arrow, weighted

# category → (CODA-LM category name, perception skill, can it move?)
CATEGORIES = {
    "car": ("vehicles", "vehicle", True),
    "truck": ("vehicles", "vehicle", True),
    "pedestrian": ("vulnerable_road_users", "vru", True),
    "cyclist": ("vulnerable_road_users", "vru", True),
    "traffic cone": ("traffic cones", "obstacle", False),
    "barrier": ("barriers", "obstacle", False),
    "debris": ("other objects", "obstacle", False),
    "traffic light": ("traffic lights", "traffic_control", False),
}
# The scene lies on Qwen2-VL's token grid (2 × 2 patches of 14 px merge into one 28 px token): each
# lane is one column of tokens and each distance one row, so a token shows at most one object.
CELL = 28
WIDTH, HEIGHT = 5 * CELL, 4 * CELL  # 140 × 112 px: 5 × 4 = 20 image tokens
LANES = {"left sidewalk": 14, "left lane": 42, "ego lane": 70, "right lane": 98, "right sidewalk": 126}
ROWS = (14, 42, 70)  # far, far, near; the ego car fills the ego lane's bottom row
ROAD_LANES = ("left lane", "ego lane", "right lane")
MOTIONS = {  # motion → (prediction skill, heading (dx, dy) on the image)
    "crossing": ("crossing", None),  # towards the ego lane, set per side
    "same direction": ("same_direction", (0, -1)),
    "oncoming": ("oncoming", (0, 1)),
    "stationary": ("stationary", None),
}
PLANS = {"keep": "keep lane", "yield": "slow down and yield", "stop": "stop",
         "steer_around": "change lane"}
QUESTION_KINDS = ("region", "identify", "motion", "enter_lane", "plan")
# Drawn after the benchmark's kinds: at weight 0 the draw over those is what it was without them.
GENERAL_KINDS = ("describe", "locate", "exists", "count", "locate_box", "color_box", "color_lane", "repeat")
DEFAULT_WEIGHTS = dict.fromkeys(GENERAL_KINDS, 0.0)  # `generate` merges user weights over these
# One colour per category, none shared with the road, grass, markings, the ego car (blue) or the
# red rectangle of region questions: a category is told by its colour and shape alone.
COLORS = {"car": "#ee2", "truck": "#f80", "pedestrian": "#f6c", "cyclist": "#90f",
          "traffic cone": "#0dd", "barrier": "#fff", "debris": "#840", "traffic light": "#111"}
COLOR_NAMES = {"car": "yellow", "truck": "orange", "pedestrian": "pink", "cyclist": "purple",
               "traffic cone": "cyan", "barrier": "white", "debris": "brown", "traffic light": "black"}


# What a general model can say when asked to (the `repeat` kind): every phrase the benchmark's answers
# use, never chosen for a scene.
PHRASES = (*CATEGORIES, *MOTIONS, *PLANS.values(), "yes", "no", *LANES, *COLOR_NAMES.values())


@dataclass
class Thing:
    category: str
    lane: str
    y: float  # image row of its centre (one of ROWS): small = far ahead
    motion: str
    light: str | None = None  # "red" / "green" for traffic lights

    @property
    def x(self) -> float:
        return LANES[self.lane]

    @property
    def near(self) -> bool:
        return self.y > HEIGHT / 2

    def box(self) -> tuple[float, float, float, float]:
        """xywh of its drawn shape."""
        w, h = {"truck": (14, 22), "car": (12, 16), "barrier": (18, 6),
                "traffic light": (8, 14)}.get(self.category, (8, 8))
        return (self.x - w / 2, self.y - h / 2, float(w), float(h))


def _key_thing(rng: random.Random, weights: Mapping[str, float]) -> Thing:
    category = weighted(rng, list(CATEGORIES), weights)
    _, _, moves = CATEGORIES[category]
    if category == "traffic light":
        return Thing(category, rng.choice(["left sidewalk", "right sidewalk"]), rng.choice(ROWS[:2]),
                     "stationary", light=rng.choice(["red", "green"]))
    if category in ("pedestrian", "cyclist"):
        lane = rng.choice(["left sidewalk", "right sidewalk", *ROAD_LANES])
        motion = rng.choice(["crossing", "stationary", "same direction"])
    elif moves:
        lane = rng.choice(ROAD_LANES)
        motion = rng.choice(["crossing", "same direction", "oncoming", "stationary"])
        if lane == "ego lane" and motion in ("crossing", "oncoming"):
            motion = "same direction"
    else:
        lane, motion = rng.choice(ROAD_LANES), "stationary"
    return Thing(category, lane, rng.choice(ROWS), motion)


def plan_for(thing: Thing) -> str:
    """The driving decision the key object calls for (a planning skill name)."""
    if thing.category == "traffic light":
        return "stop" if thing.light == "red" else "keep"
    in_path = thing.lane == "ego lane" or thing.motion == "crossing"
    if not in_path:
        return "keep"
    if CATEGORIES[thing.category][1] == "vru":
        return "stop" if thing.near else "yield"
    if thing.motion == "stationary":
        return "steer_around"  # an obstacle or a stopped vehicle in the ego lane
    if thing.motion == "crossing":
        return "yield"  # a vehicle cutting in
    return "keep"  # a vehicle ahead going our way: follow it


def will_enter_ego_lane(thing: Thing) -> bool:
    return thing.lane != "ego lane" and thing.motion == "crossing"


def _heading(thing: Thing) -> tuple[float, float] | None:
    if thing.motion == "crossing":
        return (1, 0) if thing.x < LANES["ego lane"] else (-1, 0)
    return MOTIONS[thing.motion][1]


def place(thing: Thing) -> str:
    """`in the left lane, near` / `on the right sidewalk, far`."""
    where = f"on the {thing.lane}" if "sidewalk" in thing.lane else f"in the {thing.lane}"
    return f"{where}, {'near' if thing.near else 'far'}"


def describe(things: list[Thing]) -> str:
    """A canonical scene description: each object, nearest first, with where it is and how it moves.

    `a cyclist in the left lane, near, crossing; a car in the right lane, far, oncoming.`
    """
    parts = []
    for thing in sorted(things, key=lambda t: -t.y):  # larger y: nearer the ego car
        name = f"{thing.light} {thing.category}" if thing.light else thing.category
        article = "an" if name[0] in "aeiou" else "a"
        parts.append(f"{article} {name} {place(thing)}, {thing.motion}")
    return "; ".join(parts) + "."


def render(things: list[Thing], region: Thing | None) -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), "#5a8f3c")  # grass
    draw = ImageDraw.Draw(image)
    draw.rectangle([CELL, 0, 4 * CELL, HEIGHT], fill="#555")  # road: the three middle columns
    for x in (2 * CELL, 3 * CELL):  # dashed lane markings
        for y in range(0, HEIGHT, 12):
            draw.line([(x, y), (x, y + 6)], fill="#ddd", width=1)
    draw.rectangle([64, 90, 76, 108], fill="#26c")  # ego car, in the ego lane's bottom row
    for thing in things:
        x, y, w, h = thing.box()
        shape = [x, y, x + w, y + h]
        if thing.category in ("pedestrian", "cyclist", "debris"):
            draw.ellipse(shape, fill=COLORS[thing.category])
        elif thing.category == "traffic cone":
            draw.polygon([(x + w / 2, y), (x, y + h), (x + w, y + h)], fill=COLORS[thing.category])
        else:
            draw.rectangle(shape, fill=COLORS[thing.category])
        if thing.light:
            draw.ellipse([x + 2, y + 2, x + 6, y + 6], fill=thing.light)
        heading = _heading(thing)
        if heading:
            arrow(draw, thing.x, thing.y, *heading)
    if region is not None:
        x, y, w, h = region.box()
        draw.rectangle([x - 2, y - 2, x + w + 2, y + h + 2], outline="red", width=2)
    return image


def _background(rng: random.Random, key: Thing) -> list[Thing]:
    """0–2 cars or trucks beside the key object's lane: they never matter for the plan, and a
    question that names the key object's lane can only mean the key object."""
    others: list[Thing] = []
    for _ in range(rng.randint(0, 2)):
        other = Thing(rng.choice(["car", "truck"]), rng.choice(["left lane", "right lane"]),
                      rng.choice(ROWS), rng.choice(["same direction", "oncoming"]))
        if other.lane != key.lane and all((o.lane, o.y) != (other.lane, other.y) for o in others):
            others.append(other)
    return others


def _benchmark_question(kind: str, key: Thing) -> tuple[str, str, str]:
    """(question, answer, task) of one of the benchmark's kinds, about the key object."""
    name = key.category
    if kind == "region":
        return "What is the object inside the red rectangle?", name, "region_perception"
    if kind == "identify":
        return (f"What object is in the {key.lane} {'near the ego car' if key.near else 'ahead'}?",
                name, "perception")
    if kind == "motion":
        return f"How will the {name} in the {key.lane} move?", key.motion, "prediction"
    if kind == "enter_lane":
        return (f"Will the {name} in the {key.lane} enter the ego lane?",
                "yes" if will_enter_ego_lane(key) else "no", "prediction")
    return "What should the ego vehicle do?", PLANS[plan_for(key)], "planning"


def _unique(things: list[Thing], attribute: str) -> list[Thing]:
    """The objects no other object shares `attribute` (category, lane) with."""
    return [t for t in things if sum(getattr(o, attribute) == getattr(t, attribute) for o in things) == 1]


def _general_question(rng: random.Random, kind: str,
                      things: list[Thing]) -> tuple[str, str, str | None, Thing | None]:
    """(question, answer, the category it names (None: none), the object a red rectangle marks).

    The object asked about may be background traffic; a sample's skills and `meta` still
    describe the scene's key object, as for every kind (general questions train no router).
    """
    if kind == "locate":
        thing = rng.choice(_unique(things, "category"))
        return f"Where is the {thing.category}?", place(thing), thing.category, None
    if kind == "locate_box":
        thing = rng.choice(things)
        return "Where is the object inside the red rectangle?", place(thing), None, thing
    if kind == "color_box":
        thing = rng.choice(things)
        return "What color is the object inside the red rectangle?", COLOR_NAMES[thing.category], None, thing
    if kind == "color_lane":
        thing = rng.choice(_unique(things, "lane"))
        where = f"on the {thing.lane}" if "sidewalk" in thing.lane else f"in the {thing.lane}"
        return f"What color is the object {where}?", COLOR_NAMES[thing.category], None, None
    if kind == "exists":
        present = {t.category for t in things}
        pool = sorted(present) if rng.random() < 0.5 else [c for c in CATEGORIES if c not in present]
        category = rng.choice(pool)
        answer = "yes" if category in present else "no"
        return f"Is there any {category} in the scene?", answer, category, None
    if kind == "describe":
        return "Describe the scene.", describe(things), None, None
    if kind == "repeat":  # the words answers use, said when asked to, never chosen
        phrase = rng.choice(PHRASES)
        return f"Repeat after me: {phrase}", phrase, phrase if phrase in CATEGORIES else None, None
    return "How many objects are there besides the ego vehicle?", str(len(things)), None, None


def make_sample(rng: random.Random, sample_id: str, image_path: str,
                weights: Mapping[str, float]) -> tuple[Sample, Image.Image]:
    """One sample; `weights` holds the domain's defaults merged under the user's (`generate`)."""
    key = _key_thing(rng, weights)
    things = [key, *_background(rng, key)]
    kind = weighted(rng, QUESTION_KINDS + GENERAL_KINDS, weights)
    if kind in ("motion", "enter_lane") and key.category == "traffic light":
        kind = "identify"
    if kind == "enter_lane" and key.lane == "ego lane":
        kind = "motion"
    if (kind == "locate" and not _unique(things, "category")) or (kind == "color_lane"
                                                                  and not _unique(things, "lane")):
        kind = "count"  # no object the question could name alone
    skills = {"perception": CATEGORIES[key.category][1], "prediction": "general", "planning": "general"}
    if kind in GENERAL_KINDS:  # what is seen, not what will happen or what to do: perception
        question, answer, named, marked = _general_question(rng, kind, things)
        skills["perception"] = CATEGORIES[named or key.category][1]
        task = "description" if kind == "describe" else "general_vqa"
    else:
        question, answer, task = _benchmark_question(kind, key)
        marked = key if kind == "region" else None
        if task in ("prediction", "planning"):
            skills["prediction"] = MOTIONS[key.motion][0]
        if task == "planning":
            skills["planning"] = plan_for(key)
    meta = {"domain": "driving", "question_kind": kind, "category": key.category,
            "coda_category": CATEGORIES[key.category][0], "lane": key.lane,
            "distance": "near" if key.near else "far", "motion": key.motion, "light": key.light}
    if marked is not None:
        meta["box"] = list(marked.box())
    sample = Sample(id=sample_id, images=[image_path], question=question, answer=answer, task=task,
                    skills=skills, meta=meta)
    return sample, render(things, marked)
