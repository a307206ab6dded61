"""Procedural driving scenes: a three-lane road seen from above, the ego car at the
bottom of the middle lane, one key object of a CODA-LM category and a few others.

Questions come at the three levels of the `driving` taxonomy; the right plan
follows from what is perceived (category, lane, distance) and predicted
(motion), so planning cannot be answered without the earlier levels.

One more kind, `describe` ("Describe the scene." → every object, nearest
first), is off unless a weight switches it on (`--weight describe=1`): it is
the generic task `mose demo` pretrains on before any planning question.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image, ImageDraw

from mose.data.schema import Sample
from mose.data.world.common import IMAGE_SIZE, arrow, weighted

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
LANES = {"left sidewalk": 8, "left lane": 34, "ego lane": 56, "right lane": 78, "right sidewalk": 104}
ROAD_LANES = ("left lane", "ego lane", "right lane")
MOTIONS = {  # motion → (prediction skill, heading (dx, dy) on the image)
    "crossing": ("crossing", None),  # towards the ego lane, set per side
    "same direction": ("same_direction", (0, -1)),
    "oncoming": ("oncoming", (0, 1)),
    "stationary": ("stationary", None),
}
PLANS = {"keep": "keep lane", "yield": "slow down and yield", "stop": "stop",
         "steer_around": "change lane"}
# `describe` comes last: with weight 0 the draw over the others is what it was without it.
QUESTION_KINDS = ("region", "identify", "motion", "enter_lane", "plan", "describe")
DEFAULT_WEIGHTS = {"describe": 0.0}  # user weights are merged over these
COLORS = {"car": "#d22", "truck": "#e80", "pedestrian": "#f6c", "cyclist": "#a4f",
          "traffic cone": "#f90", "barrier": "#eee", "debris": "#864", "traffic light": "#222"}


@dataclass
class Thing:
    category: str
    lane: str
    y: float  # image row of its centre: small = far ahead
    motion: str
    light: str | None = None  # "red" / "green" for traffic lights

    @property
    def x(self) -> float:
        return LANES[self.lane]

    @property
    def near(self) -> bool:
        return self.y > IMAGE_SIZE * 0.45

    def box(self) -> tuple[float, float, float, float]:
        """xywh of its drawn shape."""
        w, h = {"truck": (14, 22), "car": (12, 16), "barrier": (18, 6),
                "traffic light": (8, 14)}.get(self.category, (8, 8))
        return (self.x - w / 2, self.y - h / 2, float(w), float(h))


def _key_thing(rng: random.Random, weights: Mapping[str, float]) -> Thing:
    category = weighted(rng, list(CATEGORIES), weights)
    _, _, moves = CATEGORIES[category]
    if category == "traffic light":
        return Thing(category, rng.choice(["left sidewalk", "right sidewalk"]), rng.uniform(20, 45),
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
    return Thing(category, lane, rng.uniform(18, 70), motion)


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


def describe(things: list[Thing]) -> str:
    """A canonical scene description: each object, nearest first, with where it is and how it moves.

    `a cyclist in the left lane, near, crossing; a car in the right lane, far, oncoming.`
    """
    parts = []
    for thing in sorted(things, key=lambda t: -t.y):  # larger y: nearer the ego car
        name = f"{thing.light} {thing.category}" if thing.light else thing.category
        article = "an" if name[0] in "aeiou" else "a"
        place = f"on the {thing.lane}" if "sidewalk" in thing.lane else f"in the {thing.lane}"
        parts.append(f"{article} {name} {place}, {'near' if thing.near else 'far'}, {thing.motion}")
    return "; ".join(parts) + "."


def render(things: list[Thing], region: Thing | None) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "#5a8f3c")  # grass
    draw = ImageDraw.Draw(image)
    draw.rectangle([22, 0, 90, IMAGE_SIZE], fill="#555")  # road
    for x in (45, 67):  # dashed lane markings
        for y in range(0, IMAGE_SIZE, 12):
            draw.line([(x, y), (x, y + 6)], fill="#ddd", width=1)
    draw.rectangle([50, 96, 62, 110], fill="#26c")  # ego car
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


def make_sample(rng: random.Random, sample_id: str, image_path: str,
                weights: Mapping[str, float]) -> tuple[Sample, Image.Image]:
    weights = {**DEFAULT_WEIGHTS, **weights}
    key = _key_thing(rng, weights)
    others = []
    for _ in range(rng.randint(0, 2)):  # background traffic that never matters for the plan
        other = Thing(rng.choice(["car", "truck"]), rng.choice(["left lane", "right lane"]),
                      rng.uniform(5, 80), rng.choice(["same direction", "oncoming"]))
        if abs(other.y - key.y) > 18 or other.lane != key.lane:
            others.append(other)
    kind = weighted(rng, QUESTION_KINDS, weights)
    if kind in ("motion", "enter_lane") and key.category == "traffic light":
        kind = "identify"
    if kind == "enter_lane" and key.lane == "ego lane":
        kind = "motion"
    perception = CATEGORIES[key.category][1]
    prediction = MOTIONS[key.motion][0]
    where = f"{key.lane}, {'near' if key.near else 'far'}"
    name = key.category
    skills = {"perception": perception, "prediction": "general", "planning": "general"}
    if kind == "region":
        question, answer, task = "What is the object inside the red rectangle?", name, "region_perception"
    elif kind == "identify":
        question = f"What object is in the {key.lane} {'near the ego car' if key.near else 'ahead'}?"
        answer, task = name, "perception"
    elif kind == "motion":
        question, answer, task = f"How will the {name} in the {key.lane} move?", key.motion, "prediction"
        skills["prediction"] = prediction
    elif kind == "enter_lane":
        question = f"Will the {name} in the {key.lane} enter the ego lane?"
        answer, task = ("yes" if will_enter_ego_lane(key) else "no"), "prediction"
        skills["prediction"] = prediction
    elif kind == "describe":  # what is seen, not what to do: a perception task
        question, answer, task = "Describe the scene.", describe([key, *others]), "description"
    else:
        question, task = "What should the ego vehicle do?", "planning"
        plan = plan_for(key)
        answer = PLANS[plan]
        skills.update(prediction=prediction, planning=plan)
    meta = {"domain": "driving", "question_kind": kind, "category": name,
            "coda_category": CATEGORIES[name][0], "lane": key.lane, "distance": where.split(", ")[1],
            "motion": key.motion, "light": key.light}
    if kind == "region":
        meta["box"] = list(key.box())
    sample = Sample(id=sample_id, images=[image_path], question=question, answer=answer, task=task,
                    skills=skills, meta=meta)
    return sample, render([key, *others], key if kind == "region" else None)
